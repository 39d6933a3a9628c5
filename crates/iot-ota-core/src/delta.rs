//! Delta updates without the IO: the chunk index that the platform serves
//! next to an image, the chunking that makes it, and the planner that says
//! which chunks of a new image a device can copy from the image it already
//! has and which byte ranges it must fetch.
//!
//! The image is cut into content-defined chunks (FastCDC, 2020 version, with
//! the parameters written in the index), so an insertion or a removal moves
//! only the cut points near it, and every chunk's SHA-256 is listed. A device
//! cuts the image it has the same way, and any chunk of the new image whose
//! SHA-256 it finds there is copied, not fetched. What is left is fetched
//! with HTTP Range requests over as few ranges as allowed: adjacent chunks
//! are one range, a gap smaller than [`PlanOptions::gap`] is fetched rather
//! than skipped, and the closest ranges are merged until at most
//! [`PlanOptions::max_requests`] remain. Every chunk, copied or fetched, is
//! checked against the index, and the whole image against the command's
//! digest (and a signed manifest's SHA-256) exactly as a full download is.
//!
//! ```
//! use iot_ota_core::delta::{chunk, plan, Decision, Index, Params, PlanOptions};
//!
//! // A 1 MiB "old" image, and a new one with 4 KiB changed in the middle.
//! let old: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
//! let mut new = old.clone();
//! new[500_000..504_096].fill(0xAA);
//!
//! let params = Params::default();
//! let index = Index::build(params, &chunk(params, &mut &new[..]).unwrap());
//! // What the platform serves, and the device reads back.
//! let index = Index::parse(&index.encode()).unwrap();
//! let have = chunk(index.params, &mut &old[..]).unwrap();
//! match plan(&index, &have, &PlanOptions::default()) {
//!     Decision::Delta(p) => {
//!         assert!(p.fetch_bytes < 200_000, "{}", p.describe());
//!         assert_eq!(p.requests(), 1);
//!     }
//!     Decision::Full(why) => panic!("{why}"),
//! }
//! ```

use std::io::Read;

use sha2::{Digest as _, Sha256};

/// The chunker's parameters, written in the index: the device must cut its
/// own image with the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Smallest chunk, bytes (the last chunk of an image may be smaller).
    pub min: u32,
    /// Average chunk the cut points aim for, bytes.
    pub avg: u32,
    /// Largest chunk, bytes.
    pub max: u32,
}

impl Default for Params {
    /// 16, 32 and 64 KiB: on monthly image changes, content-defined chunks
    /// of about this size fetch a fifth to a quarter of the image (Rugix's
    /// measurements), in few enough ranges.
    fn default() -> Self {
        Params {
            min: 16 * 1024,
            avg: 32 * 1024,
            max: 64 * 1024,
        }
    }
}

impl Params {
    /// The bounds FastCDC accepts, and min <= avg <= max.
    fn check(&self) -> Result<(), String> {
        let ok = (64..=1 << 20).contains(&self.min)
            && (256..=4 << 20).contains(&self.avg)
            && (1024..=16 << 20).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "chunker sizes {}/{}/{} out of bounds (min 64 B-1 MiB, avg 256 B-4 MiB, \
                 max 1 KiB-16 MiB, min <= avg <= max)",
                self.min, self.avg, self.max
            ))
        }
    }
}

/// One chunk of an image: where it is, how long, its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Its first byte's offset in the image.
    pub offset: u64,
    /// Its length, bytes.
    pub len: u32,
    /// The SHA-256 of its bytes.
    pub sha256: [u8; 32],
}

impl Chunk {
    /// One past its last byte.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Cuts what `reader` yields into chunks with `params`, hashing each.
/// Reads at most `params.max` bytes ahead (the chunker's buffer).
pub fn chunk(params: Params, reader: &mut dyn Read) -> Result<Vec<Chunk>, String> {
    params.check()?;
    let cdc = fastcdc::v2020::StreamCDC::new(reader, params.min, params.avg, params.max);
    let mut chunks = Vec::new();
    for c in cdc {
        let c = c.map_err(|e| format!("reading the image to chunk it: {e}"))?;
        chunks.push(Chunk {
            offset: c.offset,
            len: c.length as u32,
            sha256: sha256(&c.data),
        });
    }
    Ok(chunks)
}

/// The chunk index of one image (see the module docs). Its encoding
/// ([`Index::encode`]) is what the platform serves, and what a command's
/// or signed manifest's index digest is the SHA-256 of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// How the image was cut.
    pub params: Params,
    /// The image's size, bytes.
    pub size: u64,
    /// Its chunks, in order, covering it exactly.
    pub chunks: Vec<Chunk>,
}

/// The first bytes of an encoded index, with its format's version.
const MAGIC: &[u8; 8] = b"IOTADLT1";
/// The largest index parsed: 16 MiB of image per chunk at the smallest
/// allowed average would still be far below; this bounds a hostile one.
const MAX_CHUNKS: usize = 4 << 20;

impl Index {
    /// The index of an image cut into `chunks` (from [`chunk`]) with `params`.
    pub fn build(params: Params, chunks: &[Chunk]) -> Index {
        Index {
            params,
            size: chunks.last().map_or(0, Chunk::end),
            chunks: chunks.to_vec(),
        }
    }

    /// The bytes served: `IOTADLT1`, the chunker's min, avg and max (u32,
    /// big-endian), the image size (u64), the chunk count (u32), then per
    /// chunk its length (u32) and SHA-256 (32 bytes). Offsets follow from
    /// the lengths.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.chunks.len() * 36);
        out.extend_from_slice(MAGIC);
        for v in [self.params.min, self.params.avg, self.params.max] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_be_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.len.to_be_bytes());
            out.extend_from_slice(&c.sha256);
        }
        out
    }

    /// Parses and checks an encoded index: the format, the chunker's
    /// bounds, every chunk within them (the last may be shorter), and the
    /// chunks covering exactly the size. Any other bytes are an error that
    /// says what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Index, String> {
        let mut r = bytes;
        let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
            if r.len() < n {
                return Err(format!("the chunk index ends before its {what}"));
            }
            let (head, rest) = r.split_at(n);
            r = rest;
            Ok(head)
        };
        if take(8, "format mark")? != MAGIC {
            return Err("not a chunk index (no IOTADLT1 mark)".into());
        }
        let u32_of = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
        let params = Params {
            min: u32_of(take(4, "chunker sizes")?),
            avg: u32_of(take(4, "chunker sizes")?),
            max: u32_of(take(4, "chunker sizes")?),
        };
        params.check()?;
        let size = u64::from_be_bytes(take(8, "image size")?.try_into().expect("8 bytes"));
        let count = u32_of(take(4, "chunk count")?) as usize;
        if count > MAX_CHUNKS {
            return Err(format!("{count} chunks, more than {MAX_CHUNKS}"));
        }
        // The header is 32 bytes; every chunk 36 (checked before the
        // allocation a hostile count would make).
        if bytes.len() != 32 + count * 36 {
            return Err(format!(
                "{count} chunks need {} bytes, the index has {}",
                32 + count * 36,
                bytes.len()
            ));
        }
        let mut chunks = Vec::with_capacity(count);
        let mut offset = 0u64;
        for i in 0..count {
            let len = u32_of(take(4, "chunk lengths")?);
            let sha256: [u8; 32] = take(32, "chunk digests")?.try_into().expect("32 bytes");
            let last = i + 1 == count;
            if len == 0 || len > params.max || (!last && len < params.min) {
                return Err(format!(
                    "chunk {i} is {len} bytes, outside {}..={}",
                    params.min, params.max
                ));
            }
            chunks.push(Chunk {
                offset,
                len,
                sha256,
            });
            offset += u64::from(len);
        }
        if offset != size {
            return Err(format!(
                "the chunks cover {offset} bytes, the image is {size}"
            ));
        }
        Ok(Index {
            params,
            size,
            chunks,
        })
    }
}

/// How the planner decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanOptions {
    /// Range requests at most (the closest ranges are merged until so).
    pub max_requests: usize,
    /// A gap between two ranges shorter than this is fetched with them
    /// (one request instead of two costs a round trip more than the bytes).
    pub gap: u64,
    /// The most of the image a delta may fetch, in percent of its size;
    /// above it the full image is downloaded (a delta costs chunking the
    /// old image and its own requests: it must save at least a fifth).
    pub max_percent: u8,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_requests: 64,
            gap: 64 * 1024,
            max_percent: 80,
        }
    }
}

/// One step of a delta, in the new image's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Chunk `chunk` of the new image is the old image's bytes at `from`.
    Copy {
        /// The new image's chunk (index into [`Index::chunks`]).
        chunk: usize,
        /// Where the same bytes are in the old image.
        from: u64,
    },
    /// Chunks `chunks` of the new image are fetched with one Range request
    /// (their bytes are contiguous: `start..end` of the new image).
    Fetch {
        /// The new image's chunks, in order.
        chunks: std::ops::Range<usize>,
        /// Their bytes in the new image.
        start: u64,
        /// One past their last byte.
        end: u64,
    },
}

/// A delta: the steps that write the new image in order, and what they cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The steps, covering every chunk of the new image once, in order.
    pub steps: Vec<Step>,
    /// Bytes fetched in all.
    pub fetch_bytes: u64,
    /// Bytes copied from the old image.
    pub copy_bytes: u64,
    /// The new image's size.
    pub size: u64,
}

impl Plan {
    /// Range requests the plan makes.
    pub fn requests(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Fetch { .. }))
            .count()
    }

    /// The decision as reports say it: `delta: 3.1 MiB of 64.0 MiB in 7 requests`.
    pub fn describe(&self) -> String {
        format!(
            "delta: {} of {} in {} request{}",
            mib(self.fetch_bytes),
            mib(self.size),
            self.requests(),
            if self.requests() == 1 { "" } else { "s" }
        )
    }

    /// The steps from chunk `first` of the new image on (a resume): steps
    /// before it are dropped, a fetch that spans it starts at it.
    pub fn from_chunk(&self, first: usize, index: &Index) -> Vec<Step> {
        let mut out = Vec::new();
        for step in &self.steps {
            match step {
                Step::Copy { chunk, .. } if *chunk >= first => out.push(step.clone()),
                Step::Copy { .. } => {}
                Step::Fetch { chunks, end, .. } if chunks.end > first => {
                    let from = chunks.start.max(first);
                    out.push(Step::Fetch {
                        chunks: from..chunks.end,
                        start: index.chunks[from].offset,
                        end: *end,
                    });
                }
                Step::Fetch { .. } => {}
            }
        }
        out
    }
}

/// `bytes` in MiB with one decimal, rounded (integer arithmetic: no float
/// formatting in the C library).
fn mib(bytes: u64) -> String {
    let tenths = (u128::from(bytes) * 10 + (1 << 19)) >> 20;
    format!("{}.{} MiB", tenths / 10, tenths % 10)
}

/// What to do for a new image.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Fetch what the plan says, copy the rest.
    Delta(Plan),
    /// Download the whole image; the reason, as reports say it.
    Full(String),
}

/// Plans the new image `new` from the chunks `have` of the image the device
/// has (cut with `new.params`; see [`chunk`]).
pub fn plan(new: &Index, have: &[Chunk], options: &PlanOptions) -> Decision {
    // The base's chunks by digest (sorted: a binary search each; the first
    // of equal chunks is kept).
    let mut known: Vec<([u8; 32], u64)> = have.iter().map(|c| (c.sha256, c.offset)).collect();
    known.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    known.dedup_by(|later, first| later.0 == first.0);
    let find = |sha: &[u8; 32]| {
        known
            .binary_search_by(|(k, _)| k.cmp(sha))
            .ok()
            .map(|i| known[i].1)
    };
    // Runs of chunks to fetch, as chunk index ranges.
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, c) in new.chunks.iter().enumerate() {
        if find(&c.sha256).is_some() {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    let bytes_of =
        |r: &std::ops::Range<usize>| new.chunks[r.end - 1].end() - new.chunks[r.start].offset;
    let gap_between = |a: &std::ops::Range<usize>, b: &std::ops::Range<usize>| {
        new.chunks[b.start].offset - new.chunks[a.end - 1].end()
    };
    // Small gaps are fetched.
    let mut merged: Vec<std::ops::Range<usize>> = Vec::with_capacity(runs.len());
    for r in runs {
        match merged.last_mut() {
            Some(last) if gap_between(last, &r) < options.gap => last.end = r.end,
            _ => merged.push(r),
        }
    }
    // At most max_requests: merge across the smallest gaps first.
    let max_requests = options.max_requests.max(1);
    while merged.len() > max_requests {
        let (i, _) = merged
            .windows(2)
            .enumerate()
            .map(|(i, w)| (i, gap_between(&w[0], &w[1])))
            .min_by_key(|&(_, g)| g)
            .expect("at least two ranges");
        let next = merged.remove(i + 1);
        merged[i].end = next.end;
    }
    let fetch_bytes: u64 = merged.iter().map(bytes_of).sum();
    let limit = u128::from(new.size) * u128::from(options.max_percent) / 100;
    if new.size == 0 || u128::from(fetch_bytes) > limit {
        return Decision::Full(format!(
            "delta would fetch {} of {} (more than {}%): full download",
            mib(fetch_bytes),
            mib(new.size),
            options.max_percent
        ));
    }
    let mut steps = Vec::with_capacity(new.chunks.len());
    let mut fetches = merged.into_iter().peekable();
    let mut i = 0;
    while i < new.chunks.len() {
        if let Some(r) = fetches.next_if(|r| r.start == i) {
            steps.push(Step::Fetch {
                start: new.chunks[r.start].offset,
                end: new.chunks[r.end - 1].end(),
                chunks: r.clone(),
            });
            i = r.end;
        } else {
            let from = find(&new.chunks[i].sha256).expect("a chunk not fetched is known");
            steps.push(Step::Copy { chunk: i, from });
            i += 1;
        }
    }
    Decision::Delta(Plan {
        steps,
        fetch_bytes,
        copy_bytes: new.size - fetch_bytes,
        size: new.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that look like a filesystem image: data, and runs of zeros
    /// (free blocks).
    fn image(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if (i / 65536) % 5 == 0 {
                    0
                } else {
                    (x >> 7) as u8
                }
            })
            .collect()
    }

    fn index_of(bytes: &[u8]) -> Index {
        let params = Params::default();
        Index::build(params, &chunk(params, &mut &bytes[..]).unwrap())
    }

    #[test]
    fn an_index_round_trips_and_covers_its_image() {
        let img = image(1_000_003, 1);
        let idx = index_of(&img);
        assert_eq!(idx.size, img.len() as u64);
        assert_eq!(Index::parse(&idx.encode()).unwrap(), idx);
        for c in &idx.chunks {
            let bytes = &img[c.offset as usize..c.end() as usize];
            assert_eq!(sha256(bytes), c.sha256);
        }
        assert!(
            idx.chunks.len() > 10 && idx.chunks.len() < 70,
            "{}",
            idx.chunks.len()
        );
    }

    #[test]
    fn a_bad_index_says_what_is_wrong() {
        let good = index_of(&image(300_000, 2)).encode();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"IOTADLT2".to_vec(), "not a chunk index"),
            (good[..20].to_vec(), "ends before"),
            ([&good[..], b"x"].concat(), "chunks need"),
            (good[..good.len() - 1].to_vec(), "chunks need"),
            (
                {
                    let mut b = good.clone();
                    b[8..12].copy_from_slice(&0u32.to_be_bytes());
                    b
                },
                "out of bounds",
            ),
            (
                {
                    let mut b = good.clone();
                    b[20..28].copy_from_slice(&1u64.to_be_bytes());
                    b
                },
                "the chunks cover",
            ),
            (
                {
                    let mut b = good.clone();
                    b[32..36].copy_from_slice(&1u32.to_be_bytes());
                    b
                },
                "outside",
            ),
        ];
        for (bytes, says) in cases {
            let e = Index::parse(&bytes).unwrap_err();
            assert!(e.contains(says), "{e} / {says}");
        }
    }

    #[test]
    fn a_small_change_fetches_little_and_a_new_image_falls_back() {
        let old = image(4 << 20, 3);
        let mut new = old.clone();
        // Changed in place, something inserted, something removed.
        new[1_000_000..1_010_000].fill(7);
        new.splice(2_000_000..2_000_000, image(30_000, 9));
        new.drain(3_000_000..3_050_000);
        let idx = index_of(&new);
        let have = chunk(idx.params, &mut &old[..]).unwrap();
        let Decision::Delta(p) = plan(&idx, &have, &PlanOptions::default()) else {
            panic!("a delta")
        };
        // Three edits: each costs the chunks around it (up to 64 KiB each).
        assert!(p.fetch_bytes < new.len() as u64 / 6, "{}", p.describe());
        assert!(p.requests() <= 3, "{}", p.describe());
        assert_eq!(p.fetch_bytes + p.copy_bytes, new.len() as u64);
        // The steps rebuild the new image exactly.
        let mut out = Vec::new();
        for s in &p.steps {
            match s {
                Step::Copy { chunk, from } => {
                    let len = idx.chunks[*chunk].len as usize;
                    out.extend_from_slice(&old[*from as usize..*from as usize + len]);
                }
                Step::Fetch { start, end, .. } => {
                    out.extend_from_slice(&new[*start as usize..*end as usize])
                }
            }
        }
        assert!(out == new);
        assert!(p.describe().starts_with("delta: 0."), "{}", p.describe());

        // Nothing in common: the full image.
        let other = index_of(&image(4 << 20, 4));
        match plan(&other, &have, &PlanOptions::default()) {
            Decision::Full(why) => assert!(why.contains("full download"), "{why}"),
            Decision::Delta(p) => panic!("{}", p.describe()),
        }
    }

    #[test]
    fn ranges_are_merged_down_to_the_request_limit_closest_first() {
        let old = image(2 << 20, 5);
        let mut new = old.clone();
        // Ten small changes spread out.
        for k in 0..10 {
            let at = 100_000 + k * 190_000;
            new[at..at + 100].fill(0xEE);
        }
        let idx = index_of(&new);
        let have = chunk(idx.params, &mut &old[..]).unwrap();
        let loose = PlanOptions {
            gap: 0,
            max_percent: 100,
            ..PlanOptions::default()
        };
        let Decision::Delta(all) = plan(&idx, &have, &loose) else {
            panic!()
        };
        assert_eq!(all.requests(), 10, "{}", all.describe());
        let Decision::Delta(three) = plan(
            &idx,
            &have,
            &PlanOptions {
                max_requests: 3,
                ..loose
            },
        ) else {
            panic!()
        };
        assert_eq!(three.requests(), 3);
        assert!(three.fetch_bytes > all.fetch_bytes);
        // A resume from the middle of a fetch starts that fetch there.
        let Some(Step::Fetch { chunks, .. }) = three
            .steps
            .iter()
            .find(|s| matches!(s, Step::Fetch { chunks, .. } if chunks.len() > 1))
        else {
            panic!("a fetch of several chunks")
        };
        let mid = chunks.start + 1;
        let rest = three.from_chunk(mid, &idx);
        assert_eq!(
            rest[0],
            Step::Fetch {
                chunks: mid..chunks.end,
                start: idx.chunks[mid].offset,
                end: idx.chunks[chunks.end - 1].end()
            }
        );
    }
}
