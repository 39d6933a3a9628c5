//! The example device: the Rust twin of the vendor guide's `ota_example`.
//!
//! ```text
//! ota_example --broker mqtt://HOST:PORT --product-key PK --device-name DN
//!             --firmware-version V --output-dir DIR
//!             [--username U] [--password P] [--ca-file F] [--get-version V2] [--once]
//! ```
//!
//! Connects, reports version V, and waits for upgrade commands. Each accepted
//! command is downloaded with progress reports, verified, and written to
//! `DIR/firmware-<version>.bin` atomically; then UPGRADING and SUCCESS are
//! reported and the new version informed. A failure reports its negative
//! status and the device keeps waiting. `--get-version V2` asks for V2 at
//! start and upgrades to it if the platform has it. `--once` exits after the
//! first upgrade attempt: 0 on success, 1 on failure, 2 when the
//! `--get-version` reply is 404. One line per state change goes to stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use iot_ota_device::{Config, Download, Error, OtaClient, Status};

struct Args {
    broker: String,
    product_key: String,
    device_name: String,
    firmware_version: String,
    output_dir: PathBuf,
    username: Option<String>,
    password: Option<String>,
    ca_file: Option<PathBuf>,
    get_version: Option<String>,
    once: bool,
}

const USAGE: &str =
    "usage: ota_example --broker mqtt://HOST:PORT --product-key PK --device-name DN \
--firmware-version V --output-dir DIR [--username U] [--password P] [--ca-file F] \
[--get-version V2] [--once]";

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut broker, mut pk, mut dn, mut version, mut dir) = (None, None, None, None, None);
    let (mut username, mut password, mut ca_file, mut get_version, mut once) =
        (None, None, None, None, false);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--broker" => broker = Some(value()?),
            "--product-key" => pk = Some(value()?),
            "--device-name" => dn = Some(value()?),
            "--firmware-version" => version = Some(value()?),
            "--output-dir" => dir = Some(PathBuf::from(value()?)),
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
    let (client, mut upgrades) = OtaClient::connect(config).await?;
    eprintln!(
        "connected to {}; reported version {}",
        args.broker, args.firmware_version
    );

    if let Some(wanted) = &args.get_version {
        eprintln!("asking the platform for firmware {wanted}");
        match client.get_firmware_info(wanted).await {
            Ok(firmware) => {
                eprintln!("platform has {} at {}", firmware.version, firmware.url);
                let ok = match client.download_firmware(&firmware) {
                    Ok(download) => upgrade(&client, download, &args.output_dir).await,
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
        let ok = upgrade(&client, client.download(&command), &args.output_dir).await;
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

/// Downloads, verifies, installs (writes the image file), and reports.
async fn upgrade(client: &OtaClient, download: Download, dir: &Path) -> bool {
    let version = download.firmware().version.clone();
    let path = dir.join(format!("firmware-{version}.bin"));
    eprintln!("downloading {version}");
    match download.download_to(&path).await {
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
    eprintln!("installing {}", path.display());
    let reports = client
        .report_progress(Status::Upgrading, 100, "")
        .and_then(|_| client.report_progress(Status::Success, 100, ""))
        .and_then(|_| client.report_version(&version));
    match reports {
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
