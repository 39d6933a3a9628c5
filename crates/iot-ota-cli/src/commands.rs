//! The API subcommands: firmware, batch, device list.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use iot_ota_platform::api::{BatchView, CreateBatch};
use iot_ota_platform::ApiClient;
use serde::Serialize;

use crate::table::{records_table, render, totals_line};
use crate::ApiOpts;

/// `iot-ota firmware ...`
#[derive(Subcommand, Debug)]
pub enum FirmwareCmd {
    /// Register a firmware file (MD5 and SHA-256 are computed by the platform).
    Add {
        /// Product key.
        #[arg(long, visible_alias = "product-key")]
        product: String,
        /// Version: 1-100 letters, digits, '_', '-', '.'; unique within the product.
        #[arg(long)]
        version: String,
        /// Name the file is served under (default: the file's own name).
        #[arg(long)]
        name: Option<String>,
        /// The signed manifest's security counter (default 0): devices refuse
        /// a lower one than they run. Needs a platform with --signing-key.
        #[arg(long)]
        counter: Option<u64>,
        /// The firmware file.
        file: PathBuf,
    },
    /// List registered firmware.
    List {
        /// Only this product.
        #[arg(long, visible_alias = "product-key")]
        product: Option<String>,
    },
    /// Delete a firmware (refused while a running batch uses it).
    Delete {
        /// Product key.
        #[arg(long, visible_alias = "product-key")]
        product: String,
        /// Version.
        #[arg(long)]
        version: String,
    },
}

/// `iot-ota batch ...`
#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per run: size does not matter
pub enum BatchCmd {
    /// Start a batch upgrade of a product's eligible devices (or a chosen list).
    Create {
        /// Product key.
        #[arg(long, visible_alias = "product-key")]
        product: String,
        /// Target firmware version (registered with `firmware add`).
        #[arg(long)]
        version: String,
        /// Only these devices (comma-separated); default: every eligible device.
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<String>>,
        /// Installation policy (default standard).
        #[arg(long, value_parser = ["standard", "silent"])]
        policy: Option<String>,
        /// Digest the command carries (default md5).
        #[arg(long, value_parser = ["md5", "sha256"])]
        sign_method: Option<String>,
        /// Validity period, 1-7 days.
        #[arg(long)]
        validity_days: Option<u32>,
        /// Upgrade timeout from the first progress, 1-1440 minutes.
        #[arg(long)]
        timeout_minutes: Option<u32>,
        /// Retries after a failure, 0-5.
        #[arg(long)]
        retries: Option<u32>,
        /// Retry interval, 1-4320 minutes.
        #[arg(long)]
        retry_interval_minutes: Option<u32>,
        /// Override: validity period in seconds (tests, demos).
        #[arg(long)]
        validity_secs: Option<f64>,
        /// Override: upgrade timeout in seconds.
        #[arg(long)]
        timeout_secs: Option<f64>,
        /// Override: retry interval in seconds.
        #[arg(long)]
        retry_interval_secs: Option<f64>,
        /// Override: how long a push waits for the device's reply, seconds (default 10).
        #[arg(long)]
        ack_timeout_secs: Option<f64>,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// A batch and every record: state, progress bar, version, reason.
    Show {
        /// Batch id.
        id: i64,
        /// Redraw every second until the batch is no longer in progress.
        #[arg(long)]
        watch: bool,
    },
    /// Every batch, newest first.
    List,
    /// Stop a batch: unfinished records fail with "batch terminated".
    Terminate {
        /// Batch id.
        id: i64,
    },
    /// Pause a batch: nothing new is pushed; records already pushed go on.
    Pause {
        /// Batch id.
        id: i64,
    },
    /// Resume a paused batch (one its error threshold paused, too).
    Resume {
        /// Batch id.
        id: i64,
    },
}

/// A batch's rollout rules (`batch create`, `fleet`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RolloutArgs {
    /// Rollout groups, in order: counts (100) or percentages of the batch's
    /// devices (10%), comma-separated; the rest form one last group.
    #[arg(long, value_delimiter = ',')]
    pub groups: Option<Vec<String>>,
    /// Percentage of a group in success that starts the next group (1-100, default 100).
    #[arg(long)]
    pub success_threshold: Option<u32>,
    /// Failed records in a group that pause the batch: a count (5) or a
    /// percentage of the group (10%).
    #[arg(long)]
    pub error_threshold: Option<String>,
    /// Pushes per minute at most, jittered.
    #[arg(long)]
    pub push_rate: Option<u32>,
}

impl RolloutArgs {
    /// Puts the rules into a batch request.
    pub fn apply(self, req: &mut CreateBatch) {
        req.groups = self.groups;
        req.success_threshold = self.success_threshold;
        req.error_threshold = self.error_threshold;
        req.push_rate = self.push_rate;
    }
}

/// Whether `url`'s host is this machine (127.0.0.0/8, localhost, ::1).
fn is_loopback_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or("");
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn client(api: &ApiOpts) -> Result<ApiClient, String> {
    let mut client = ApiClient::new(&api.api).map_err(|e| e.to_string())?;
    if let Some(ca) = &api.ca_file {
        client = client.with_ca_file(ca).map_err(|e| e.to_string())?;
    }
    // --token (or $IOT_OTA_API_TOKEN); else, for a platform on this
    // machine only, the local platform's default file (never sent away).
    let local = is_loopback_url(&api.api);
    let token = api.token.clone().or_else(|| {
        if !local {
            return None;
        }
        let file = std::path::Path::new("iot-ota-data").join(iot_ota_platform::token::TOKEN_FILE);
        std::fs::read_to_string(file)
            .ok()
            .map(|t| t.trim().to_owned())
    });
    Ok(match token {
        Some(t) => client.with_token(t),
        None => client,
    })
}

fn print_json<T: Serialize>(v: &T) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn short(hex: &str) -> String {
    hex.chars().take(12).collect()
}

/// `iot-ota firmware ...`
pub async fn firmware(api: &ApiOpts, cmd: FirmwareCmd) -> Result<ExitCode, String> {
    let c = client(api)?;
    match cmd {
        FirmwareCmd::Add {
            product,
            version,
            name,
            counter,
            file,
        } => {
            let bytes =
                std::fs::read(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
            let name = name.unwrap_or_else(|| {
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "firmware.bin".into())
            });
            let fw = c
                .add_firmware_signed(&product, &version, &name, &bytes, counter)
                .await
                .map_err(|e| e.to_string())?;
            if api.json {
                print_json(&fw)?;
            } else {
                println!(
                    "added {} {} ({} bytes, md5 {}, sha256 {})\n  {}",
                    fw.product, fw.version, fw.size, fw.md5, fw.sha256, fw.url
                );
                match (fw.key_ids.first(), fw.counter) {
                    (Some(id), Some(n)) => println!("  signed by key {id}, counter {n}"),
                    _ => println!("  unsigned (the platform has no signing key)"),
                }
            }
        }
        FirmwareCmd::List { product } => {
            let list = c
                .list_firmware(product.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            if api.json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|f| {
                        vec![
                            f.product.clone(),
                            f.version.clone(),
                            f.name.clone(),
                            f.size.to_string(),
                            short(&f.md5),
                            short(&f.sha256),
                            f.url.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &["PRODUCT", "VERSION", "NAME", "SIZE", "MD5", "SHA256", "URL"],
                        &rows
                    )
                );
            }
        }
        FirmwareCmd::Delete { product, version } => {
            c.delete_firmware(&product, &version)
                .await
                .map_err(|e| e.to_string())?;
            if api.json {
                print_json(
                    &serde_json::json!({"deleted": {"product": product, "version": version}}),
                )?;
            } else {
                println!("deleted {product} {version}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show(b: &BatchView) -> String {
    format!(
        "{}\n{}{}",
        totals_line(b),
        rollout_lines(b),
        records_table(b, true)
    )
}

/// The rollout's groups and pause reason, when the batch has rules.
pub fn rollout_lines(b: &BatchView) -> String {
    let mut out = String::new();
    if let Some(why) = &b.paused {
        out.push_str(&format!("PAUSED: {why} (iot-ota batch resume {})\n", b.id));
    }
    let r = &b.rollout;
    if b.groups.len() > 1 || r.push_rate.is_some() || r.error_threshold.is_some() {
        let mut rules = vec![format!("next group at {}% success", r.success_threshold)];
        if let Some(t) = &r.error_threshold {
            rules.push(format!("pause at {t} failed"));
        }
        if let Some(p) = r.push_rate {
            rules.push(format!("{p} pushes/min"));
        }
        out.push_str(&format!("rollout: {}\n", rules.join(", ")));
        for (i, g) in b.groups.iter().enumerate() {
            let mark = if i + 1 == b.group as usize {
                " <- pushing"
            } else {
                ""
            };
            out.push_str(&format!(
                "  group {}: {} devices, {} success, {} failed{mark}\n",
                i + 1,
                g.total,
                g.success,
                g.failed
            ));
        }
    }
    out
}

/// `iot-ota batch ...`
pub async fn batch(api: &ApiOpts, cmd: BatchCmd) -> Result<ExitCode, String> {
    let c = client(api)?;
    match cmd {
        BatchCmd::Create {
            product,
            version,
            devices,
            policy,
            sign_method,
            validity_days,
            timeout_minutes,
            retries,
            retry_interval_minutes,
            validity_secs,
            timeout_secs,
            retry_interval_secs,
            ack_timeout_secs,
            rollout,
        } => {
            let mut req = CreateBatch {
                product,
                firmware_version: version,
                devices,
                policy,
                sign_method,
                validity_days,
                timeout_minutes,
                retries,
                retry_interval_minutes,
                validity_secs,
                timeout_secs,
                retry_interval_secs,
                ack_timeout_secs,
                ..CreateBatch::default()
            };
            rollout.apply(&mut req);
            let created = c.create_batch(&req).await.map_err(|e| e.to_string())?;
            if api.json {
                print_json(&created)?;
            } else {
                println!(
                    "batch {} created: {} to upgrade to {}",
                    created.batch.id,
                    crate::table::count(created.batch.totals.total as u64, "device"),
                    created.batch.firmware_version
                );
                for e in &created.excluded {
                    println!("  excluded {}: {}", e.device, e.reason);
                }
            }
        }
        BatchCmd::Show { id, watch } => {
            return loop {
                let b = c.show_batch(id).await.map_err(|e| e.to_string())?;
                if api.json {
                    print_json(&b)?;
                } else {
                    if watch && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                        // Clear the screen and home the cursor between frames
                        // (a pipe or a file gets the frames one after another).
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", show(&b));
                }
                if !watch || b.state != "in_progress" {
                    // Watching to the end says how it ended: 1 when a record failed.
                    let failed = watch && b.totals.failed > 0;
                    break Ok(if failed {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    });
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
        }
        BatchCmd::List => {
            let list = c.list_batches().await.map_err(|e| e.to_string())?;
            if api.json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|b| {
                        vec![
                            b.id.to_string(),
                            b.product.clone(),
                            b.firmware_version.clone(),
                            b.state.clone(),
                            b.policy.clone(),
                            b.totals.total.to_string(),
                            b.totals.success.to_string(),
                            b.totals.failed.to_string(),
                            b.totals.unfinished.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &[
                            "ID",
                            "PRODUCT",
                            "VERSION",
                            "STATE",
                            "POLICY",
                            "RECORDS",
                            "SUCCESS",
                            "FAILED",
                            "UNFINISHED"
                        ],
                        &rows
                    )
                );
            }
        }
        BatchCmd::Terminate { id } | BatchCmd::Pause { id } | BatchCmd::Resume { id } => {
            let b = match cmd {
                BatchCmd::Pause { .. } => c.pause_batch(id).await,
                BatchCmd::Resume { .. } => c.resume_batch(id).await,
                _ => c.terminate_batch(id).await,
            }
            .map_err(|e| e.to_string())?;
            if api.json {
                print_json(&b)?;
            } else {
                print!("{}", show(&b));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `iot-ota device list`
pub async fn devices(api: &ApiOpts, product: Option<String>) -> Result<ExitCode, String> {
    let c = client(api)?;
    let list = c
        .list_devices(product.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    if api.json {
        print_json(&list)?;
    } else {
        let now = iot_ota_platform::now_ms();
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|d| {
                vec![
                    d.product.clone(),
                    d.device.clone(),
                    if d.version.is_empty() {
                        "-".into()
                    } else {
                        d.version.clone()
                    },
                    if d.last_seen_ms == 0 {
                        "never".into()
                    } else {
                        format!("{} ago", crate::table::duration_ms(now - d.last_seen_ms))
                    },
                    d.credential.clone().unwrap_or_else(|| "none".into()),
                ]
            })
            .collect();
        print!(
            "{}",
            render(
                &["PRODUCT", "DEVICE", "VERSION", "LAST SEEN", "CREDENTIAL"],
                &rows
            )
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `iot-ota device add`.
pub async fn add_devices(
    api: &ApiOpts,
    product: &str,
    devices: &[String],
) -> Result<ExitCode, String> {
    let c = client(api)?;
    let reg = c
        .register_devices(product, devices)
        .await
        .map_err(|e| e.to_string())?;
    if api.json {
        print_json(&reg)?;
    } else {
        let rows: Vec<Vec<String>> = reg
            .devices
            .iter()
            .map(|d| vec![d.device.clone(), d.username.clone(), d.secret.clone()])
            .collect();
        print!(
            "{}",
            render(&["DEVICE", "MQTT USER", "MQTT PASSWORD"], &rows)
        );
        eprintln!("iot-ota: the passwords are shown once: the platform keeps only their SHA-256");
    }
    Ok(ExitCode::SUCCESS)
}

/// `iot-ota device revoke`.
pub async fn revoke_device(api: &ApiOpts, product: &str, device: &str) -> Result<ExitCode, String> {
    let c = client(api)?;
    c.revoke_device(product, device)
        .await
        .map_err(|e| e.to_string())?;
    if api.json {
        print_json(&serde_json::json!({"revoked": format!("{product}/{device}")}))?;
    } else {
        println!("revoked {product}/{device}: its connection is closed and it cannot log in");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::is_loopback_url;

    #[test]
    fn the_local_token_goes_only_to_this_machine() {
        for url in [
            "http://127.0.0.1:8080",
            "https://localhost",
            "http://[::1]:9/x",
            "http://127.0.0.9",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://localhost.example.com",
            "http://10.0.0.1:8080",
            "https://[2001:db8::1]",
            "ftp://127.0.0.1",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }
}
