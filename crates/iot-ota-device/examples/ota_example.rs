//! The example device: the Rust twin of the vendor guide's `ota_example`.
//!
//! ```text
//! ota_example --broker mqtt://HOST:PORT --product-key PK --device-name DN
//!             --firmware-version V --output-dir DIR [--state-dir S]
//!             [--trust-key PEM]... [--revoke-key ID]...
//!             [--username U] [--password P] [--ca-file F] [--get-version V2] [--once]
//! ```
//!
//! Keeps the upgrade journal in S (default DIR) and makes the start-up
//! decision ([`iot_ota_device::lifecycle`]): a download a crash cut off goes
//! on by itself. Connects, reports version V, and waits for upgrade commands.
//! Each accepted command is downloaded with progress reports into
//! `S/firmware-<version>.bin` (resuming its `.part` after a crash), verified,
//! and moved to `DIR/firmware-<version>.bin`; writing the file is the install
//! and needs no reboot, so it is the commit: UPGRADING and SUCCESS are
//! reported and the new version informed. A failure reports its negative
//! status and the device keeps waiting. `--trust-key PEM` (repeatable) pins a
//! public key: only firmware whose signed manifest it verifies is accepted,
//! never below the security counter kept in S; `--revoke-key ID` (the
//! key's hex SHA-256 SubjectPublicKeyInfo id) makes a pinned key's
//! signatures count no more. `--get-version V2` asks for V2 at
//! start and upgrades to it if the platform has it. `--once` exits after the
//! first upgrade attempt: 0 on success, 1 on failure, 2 when the
//! `--get-version` reply is 404. One line per state change goes to stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use iot_ota_device::install::Installer;
use iot_ota_device::lifecycle::{Installed, Lifecycle, Next, Resumed};
use iot_ota_device::{Config, Download, Error, OtaClient, Status};

type Life = Lifecycle<FileInstall>;

/// This device's install: the verified image moves from the state directory
/// to `DIR/firmware-<version>.bin`, and then that version runs (no reboot,
/// no slots). The SDK's flow journals, reports and decides around it.
struct FileInstall {
    output: PathBuf,
    running: String,
}

impl FileInstall {
    fn path(&self, version: &str) -> PathBuf {
        self.output.join(format!("firmware-{version}.bin"))
    }
}

impl Installer for FileInstall {
    fn name(&self) -> &str {
        "file"
    }

    fn running_version(&mut self) -> Result<String, String> {
        Ok(self.running.clone())
    }

    /// The running version's file, if there is one: the base of a delta
    /// update (only the chunks it lacks are fetched).
    fn running_image(&self) -> Option<PathBuf> {
        let path = self.path(&self.running);
        path.is_file().then_some(path)
    }

    fn install(
        &mut self,
        staged: &Path,
        version: &str,
        progress: &mut dyn FnMut(u32),
    ) -> Result<(), String> {
        let path = self.path(version);
        eprintln!("installing {}", path.display());
        if staged != path {
            std::fs::rename(staged, &path)
                .or_else(|_| {
                    std::fs::copy(staged, &path)
                        .and_then(|_| std::fs::File::open(&path)?.sync_all())
                        .and_then(|()| std::fs::remove_file(staged))
                })
                .map_err(|e| format!("moving the image to {}: {e}", path.display()))?;
        }
        self.running = version.to_owned();
        progress(100);
        Ok(())
    }

    fn needs_reboot(&self) -> bool {
        false
    }

    fn reboot(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn commit(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Nothing to switch back to: the file of the old version stays where
    /// it was.
    fn roll_back(&mut self, _new_image_running: bool) -> Result<(), String> {
        Ok(())
    }
}

struct Args {
    broker: String,
    product_key: String,
    device_name: String,
    firmware_version: String,
    output_dir: PathBuf,
    state_dir: Option<PathBuf>,
    trust_keys: Vec<PathBuf>,
    revoked_keys: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    ca_file: Option<PathBuf>,
    get_version: Option<String>,
    once: bool,
}

const USAGE: &str =
    "usage: ota_example --broker mqtt://HOST:PORT --product-key PK --device-name DN \
--firmware-version V --output-dir DIR [--state-dir S] [--trust-key PEM]... [--revoke-key ID]... \
[--username U] \
[--password P] [--ca-file F] \
[--get-version V2] [--once]";

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut broker, mut pk, mut dn, mut version, mut dir) = (None, None, None, None, None);
    let (mut username, mut password, mut ca_file, mut get_version, mut once) =
        (None, None, None, None, false);
    let mut state_dir = None;
    let mut trust_keys = Vec::new();
    let mut revoked_keys = Vec::new();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--broker" => broker = Some(value()?),
            "--product-key" => pk = Some(value()?),
            "--device-name" => dn = Some(value()?),
            "--firmware-version" => version = Some(value()?),
            "--output-dir" => dir = Some(PathBuf::from(value()?)),
            "--state-dir" => state_dir = Some(PathBuf::from(value()?)),
            "--trust-key" => trust_keys.push(PathBuf::from(value()?)),
            "--revoke-key" => revoked_keys.push(value()?),
            "--username" => username = Some(value()?),
            "--password" => password = Some(value()?),
            "--ca-file" => ca_file = Some(PathBuf::from(value()?)),
            "--get-version" => get_version = Some(value()?),
            "--once" => once = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let need = |v: Option<String>, name: &str| v.ok_or_else(|| format!("{name} is required"));
    Ok(Args {
        broker: need(broker, "--broker")?,
        product_key: need(pk, "--product-key")?,
        device_name: need(dn, "--device-name")?,
        firmware_version: need(version, "--firmware-version")?,
        output_dir: dir.ok_or("--output-dir is required")?,
        state_dir,
        trust_keys,
        revoked_keys,
        username,
        password,
        ca_file,
        get_version,
        once,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("ota_example: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    // One thread is plenty for a device: the download's hashing and writing
    // get their own worker thread inside the SDK.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ota_example: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<u8, Error> {
    std::fs::create_dir_all(&args.output_dir)?;
    let state_dir = args.state_dir.clone().unwrap_or(args.output_dir.clone());
    // Before the first inform: what the journal's upgrade needs. This
    // device installs by writing a file, with no reboot and no slots.
    let mut life = Lifecycle::open(
        &state_dir,
        FileInstall {
            output: args.output_dir.clone(),
            running: args.firmware_version.clone(),
        },
    )?;
    let start = life.at_start(None)?;
    if let Some(why) = life.set_aside() {
        eprintln!("{why}: set aside");
    }
    let mut config = Config::new(
        &args.broker,
        &args.product_key,
        &args.device_name,
        &args.firmware_version,
    )?;
    if let Some(u) = &args.username {
        config = config.username(u.clone());
    }
    if let Some(p) = &args.password {
        config = config.password(p.clone());
    }
    if let Some(ca) = &args.ca_file {
        config = config.ca_file(ca.clone());
    }
    if let Some(report) = start.report.clone() {
        config = config.report_at_start(report);
    }
    for key in &args.trust_keys {
        config = config.trust_key_file(key)?;
    }
    for id in &args.revoked_keys {
        config = config.revoke_key(id.clone());
    }
    config = config
        .security_counter(life.security_counter())
        .download_dir(&state_dir)
        // The 200 waits for the journal (`Lifecycle::accept`).
        .ack_after_journal(true);
    let (client, mut upgrades) = OtaClient::connect(config).await?;
    life.attach(client.session().clone());
    eprintln!(
        "connected to {}; reported version {}",
        args.broker, args.firmware_version
    );
    if let Next::Resume(firmware) | Next::Install(firmware) = &start.next {
        eprintln!(
            "going on with the upgrade to {} a crash cut off",
            firmware.version
        );
        let image = state_dir.join(format!("firmware-{}.bin", firmware.version));
        let ok = match life.resume(image.exists()) {
            Ok(Resumed::Fetch(fw)) => {
                upgrade(&mut life, Some(client.resume_download(&fw)), &image).await
            }
            Ok(Resumed::Install(_)) => upgrade(&mut life, None, &image).await,
            Err(e) => {
                eprintln!("cannot go on with the upgrade: {e}");
                false
            }
        };
        if args.once {
            return finish(client, ok).await;
        }
    }

    if let Some(wanted) = &args.get_version {
        eprintln!("asking the platform for firmware {wanted}");
        match client.get_firmware_info(wanted).await {
            Ok(firmware) => {
                eprintln!("platform has {} at {}", firmware.version, firmware.url);
                let image = state_dir.join(format!("firmware-{}.bin", firmware.version));
                let ok = match client.download_firmware(&firmware) {
                    // A get reply has no 200 to hold: the journal, then the download.
                    Ok(download) => match life.accept(&firmware, "get") {
                        Ok(()) => upgrade(&mut life, Some(download), &image).await,
                        Err(e) => {
                            eprintln!("{e}");
                            false
                        }
                    },
                    Err(e) => {
                        eprintln!("cannot start the upgrade: {e}");
                        false
                    }
                };
                if args.once {
                    return finish(client, ok).await;
                }
            }
            Err(Error::NotFound { code, message }) => {
                eprintln!("firmware {wanted} not available ({code}): {message}");
                if args.once {
                    client.disconnect().await;
                    return Ok(2);
                }
            }
            Err(e) => {
                eprintln!("firmware query failed: {e}");
                if args.once {
                    return finish(client, false).await;
                }
            }
        }
    }

    eprintln!("waiting for upgrade commands");
    while let Some(command) = upgrades.next().await {
        let fw = &command.firmware;
        eprintln!(
            "upgrade command {}: version {}, {} bytes, {} {}",
            command.msg_id,
            fw.version,
            fw.size.map_or("?".into(), |s| s.to_string()),
            fw.sign_method,
            fw.url
        );
        // Journaled, then acknowledged (`ack_after_journal`).
        let image = state_dir.join(format!("firmware-{}.bin", fw.version));
        let ok = match life.accept(fw, &command.msg_id) {
            Ok(()) => upgrade(&mut life, Some(client.download(&command)), &image).await,
            Err(e) => {
                eprintln!("{e}");
                false
            }
        };
        if args.once {
            return finish(client, ok).await;
        }
        eprintln!("waiting for upgrade commands");
    }
    Err(Error::Closed)
}

async fn finish(client: OtaClient, ok: bool) -> Result<u8, Error> {
    client.disconnect().await;
    Ok(if ok { 0 } else { 1 })
}

/// Downloads and verifies into `staged` (unless the verified image is there
/// already), then installs: the SDK's flow journals each step, reports
/// UPGRADING, SUCCESS and the new version, or the failure.
async fn upgrade(life: &mut Life, download: Option<Download>, staged: &Path) -> bool {
    if let Some(download) = download {
        let version = download.firmware().version.clone();
        eprintln!("downloading {version}");
        match life.download_to(download, staged).await {
            Ok(verified) => eprintln!(
                "downloaded and verified {} bytes, digest {}",
                verified.size, verified.digest
            ),
            Err(e) => {
                let status = e.status().unwrap_or(Status::DownloadFailed);
                eprintln!("upgrade to {version} failed, reported {status}: {e}");
                return false;
            }
        }
    }
    let version = life
        .journal()
        .map(|j| j.target_version.clone())
        .unwrap_or_default();
    match life.install(staged, None, &mut |_| {}) {
        Ok(Installed::Settled(start)) if start.running == version => {
            eprintln!("upgraded to {version}; reported SUCCESS and version {version}");
            true
        }
        Ok(Installed::Settled(start)) => {
            eprintln!("{version} did not settle: running {}", start.running);
            false
        }
        Ok(Installed::Rebooting) => {
            eprintln!("{version} installed; it runs after a reboot");
            true
        }
        Err(e) => {
            eprintln!("install: {e}");
            false
        }
    }
}
