//! Plain text tables and small formatters for people.

use iot_ota_platform::api::{BatchView, RecordView};

/// Renders rows under a header, columns padded to their widest cell.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    out.push_str(&line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// `[#####.....]  50%`
pub fn bar(percent: u32, width: usize) -> String {
    let filled = (percent.min(100) as usize * width) / 100;
    format!(
        "[{}{}] {:>3}%",
        "#".repeat(filled),
        ".".repeat(width - filled),
        percent.min(100)
    )
}

/// The overall percent of a record: download is the first half, install the second.
pub fn overall_percent(r: &RecordView) -> u32 {
    let pct = match (r.state.as_str(), r.status) {
        ("success", _) => return 100,
        (_, Some(1)) => r.progress / 2,
        (_, Some(2)) => 50,
        (_, Some(3)) => 50 + r.progress / 2,
        (_, Some(4)) => 100,
        // A failure shows how far it got: a download or digest failure in
        // the download half, a flash failure in the install half.
        (_, Some(-2 | -3)) => r.progress / 2,
        (_, Some(-4)) => 50 + r.progress / 2,
        _ => 0,
    };
    // Only a success fills the bar.
    if r.state == "success" {
        pct
    } else {
        pct.min(99)
    }
}

/// Bytes in MiB with one decimal (`12.3 MiB`), KiB below one MiB.
pub fn bytes(n: u64) -> String {
    if n < 1 << 20 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    }
}

/// `1 device`, `2 devices`.
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// What a record's state means in words, with its failure reason.
pub fn reason_text(r: &RecordView) -> String {
    let words = |s: &str| s.replace('_', " ");
    match (r.state.as_str(), &r.reason, &r.last_failure) {
        ("failed", Some(reason), _) => {
            let reason = words(reason);
            if r.desc.is_empty() {
                reason
            } else if r.desc.starts_with(&reason) {
                // "rolled back: 2.0.0 -> 1.0.0: ..." says it already.
                r.desc.clone()
            } else {
                format!("{reason}: {}", r.desc)
            }
        }
        ("awaiting_retry", Some(reason), _) => format!("retry after {}", words(reason)),
        ("success", _, Some(last)) => format!("retried after {}", words(last)),
        _ => String::new(),
    }
}

/// `1.25 s`, `2m 03s`.
pub fn duration_ms(ms: i64) -> String {
    if ms < 60_000 {
        format!("{:.2} s", ms as f64 / 1000.0)
    } else {
        format!("{}m {:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// The record table of `batch show` and the demo.
pub fn records_table(b: &BatchView, with_bars: bool) -> String {
    let mut header = vec!["DEVICE", "STATE"];
    if with_bars {
        header.push("PROGRESS");
    }
    header.extend(["VERSION", "ATTEMPTS", "DURATION", "REASON"]);
    let rows: Vec<Vec<String>> = b
        .records
        .iter()
        .map(|r| {
            let mut row = vec![r.device.clone(), r.state.clone()];
            if with_bars {
                row.push(bar(overall_percent(r), 20));
            }
            row.push(r.version.clone().unwrap_or_else(|| "-".into()));
            row.push(r.attempts.to_string());
            row.push(
                r.finished_ms
                    .map(|f| duration_ms(f - b.created_ms))
                    .unwrap_or_else(|| "-".into()),
            );
            row.push(reason_text(r));
            row
        })
        .collect();
    render(&header, &rows)
}

/// `batch 3 (pk -> 2.0.0) completed: 7 records, 6 success, 1 failed, 0 unfinished`
pub fn totals_line(b: &BatchView) -> String {
    let t = b.totals;
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for r in b.records.iter().filter(|r| r.state == "failed") {
        let reason = r.reason.clone().unwrap_or_default().replace('_', " ");
        match reasons.iter_mut().find(|(n, _)| *n == reason) {
            Some((_, c)) => *c += 1,
            None => reasons.push((reason, 1)),
        }
    }
    let mut s = format!(
        "batch {} ({} -> {}) {}: {}, {} success, {} failed, {} unfinished",
        b.id,
        b.product,
        b.firmware_version,
        b.state.replace('_', " "),
        count(t.total as u64, "record"),
        t.success,
        t.failed,
        t.unfinished
    );
    if !reasons.is_empty() {
        let list: Vec<String> = reasons.iter().map(|(n, c)| format!("{n}: {c}")).collect();
        s.push_str(&format!(" ({})", list.join(", ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_bars() {
        let t = render(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "".into()]],
        );
        assert_eq!(t, "A    BB\n---  --\nxxx  y\nz\n");
        assert_eq!(bar(50, 10), "[#####.....]  50%");
        assert_eq!(bar(130, 4), "[####] 100%");
        assert_eq!(duration_ms(1250), "1.25 s");
        assert_eq!(duration_ms(123_000), "2m 03s");
    }
}
