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

use std::path::PathBuf;
use std::process::ExitCode;

use iot_ota_device::install::Application;
use iot_ota_device::lifecycle::{Installed, Lifecycle, Next};
use iot_ota_device::{Config, Download, Error, OtaClient, Status};

type Life = Lifecycle<Application>;

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
    let dirs = Dirs {
        output: args.output_dir.clone(),
        state: state_dir.clone(),
    };
    // Before the first inform: what the journal's upgrade needs. This
    // device installs by writing a file, with no reboot and no slots.
    let mut life = Lifecycle::open(
        &state_dir,
        Application {
            running: args.firmware_version.clone(),
            reboot: false,
        },
    )?;
    let start = life.at_start(None)?;
    if let Some(why) = &start.set_aside {
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
    eprintln!(
        "connected to {}; reported version {}",
        args.broker, args.firmware_version
    );
    if let Next::Resume(firmware) | Next::Install(firmware) = &start.next {
        eprintln!(
            "going on with the upgrade to {} a crash cut off",
            firmware.version
        );
        let ok = match client.download_firmware(firmware) {
            Ok(download) => upgrade(&client, &mut life, download, &dirs, None).await,
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
                let ok = match client.download_firmware(&firmware) {
                    Ok(download) => upgrade(&client, &mut life, download, &dirs, Some("get")).await,
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
        let download = client.download(&command);
        let ok = upgrade(&client, &mut life, download, &dirs, Some(&command.msg_id)).await;
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

/// Where images go (`output`) and where the journal and part files live.
struct Dirs {
    output: PathBuf,
    state: PathBuf,
}

/// Downloads, verifies, installs (writes the image file), and reports;
/// `msg_id` journals a new upgrade (`None`: going on with the journal's).
async fn upgrade(
    client: &OtaClient,
    life: &mut Life,
    download: Download,
    dirs: &Dirs,
    msg_id: Option<&str>,
) -> bool {
    let firmware = download.firmware().clone();
    let version = firmware.version.clone();
    if let Some(id) = msg_id {
        // Journaled, then acknowledged (a get reply has nothing to ack).
        if let Err(desc) = life.accept(client.session(), &firmware, id) {
            eprintln!("{desc}");
            return false;
        }
    }
    let staged = dirs.state.join(format!("firmware-{version}.bin"));
    let path = dirs.output.join(format!("firmware-{version}.bin"));
    eprintln!("downloading {version}");
    match download.download_to(&staged).await {
        Ok(verified) => eprintln!(
            "downloaded and verified {} bytes, digest {}",
            verified.size, verified.digest
        ),
        Err(e) => {
            let status = e.status().unwrap_or(Status::DownloadFailed);
            eprintln!("upgrade to {version} failed, reported {status}: {e}");
            let _ = life.failed(&e.to_string());
            return false;
        }
    }
    eprintln!("installing {}", path.display());
    let _ = client.report_progress(Status::Upgrading, 100, "");
    if let Err(e) = life.downloaded() {
        eprintln!("journal: {e}");
    }
    let moved = if staged == path {
        Ok(())
    } else {
        std::fs::rename(&staged, &path).or_else(|_| {
            std::fs::copy(&staged, &path)
                .and_then(|_| std::fs::File::open(&path)?.sync_all())
                .and_then(|()| std::fs::remove_file(&staged))
        })
    };
    if let Err(e) = moved {
        let desc = format!("moving the image to {}: {e}", path.display());
        eprintln!("{desc}");
        let _ = life.failed(&desc);
        let _ = client.report_progress(Status::FlashFailed, 100, &desc);
        return false;
    }
    // The file is written: with no reboot, that is the commit.
    let settled = match life.install(&path, None, &mut |_| {}) {
        Ok(Installed::Settled(start)) => start,
        Ok(Installed::Rebooting) => {
            eprintln!("{version} installed; it runs after a reboot");
            return true;
        }
        Err(e) => {
            eprintln!("install: {e}");
            let _ = client.report_progress(Status::FlashFailed, 100, &e.to_string());
            return false;
        }
    };
    life.report_settled(client.session(), &settled);
    match client.report_version(&settled.running) {
        Ok(()) => {
            eprintln!("upgraded to {version}; reported SUCCESS and version {version}");
            true
        }
        Err(e) => {
            eprintln!("reporting failed: {e}");
            false
        }
    }
}
