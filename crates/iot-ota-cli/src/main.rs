//! `iot-ota`: the local IoT platform, its command line, the device agent and the demo.
//!
//! ```text
//! iot-ota demo [--devices N] [--with-faults]        one-command upgrade on loopback
//! iot-ota fleet --devices N [--api URL --broker URL] N simulated devices through one batch
//! iot-ota platform [--data-dir D] [--http ADDR] [--broker URL | --mqtt-listen ADDR]
//! iot-ota firmware add|list|delete ...              over the platform's HTTP API
//! iot-ota batch create|show|list|terminate ...
//! iot-ota device list                               known devices
//! iot-ota device run --config FILE                  the device agent (on the SDK)
//! ```
//!
//! Every API subcommand takes `--api URL` (default `http://127.0.0.1:8080`,
//! or `$IOT_OTA_API`) and `--json` for scripts.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod agent;
mod commands;
mod demo;
mod fleet;
mod logger;
mod table;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The local IoT OTA platform, its command line, a device agent and a demo.
#[derive(Parser, Debug)]
#[command(name = "iot-ota", version, about)]
struct Cli {
    /// More log lines on stderr: -v info (pushes, replies, reports,
    /// reconnects, the device's steps), -vv debug. RUST_LOG wins when set.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// Where the platform's API is, and the output form.
#[derive(Args, Debug, Clone)]
struct ApiOpts {
    /// Base URL of the platform's HTTP API.
    #[arg(
        long,
        global = true,
        env = "IOT_OTA_API",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    /// The platform's API token, for requests that change something
    /// (default: the file iot-ota-data/api-token, when it is there).
    #[arg(long, global = true, env = "IOT_OTA_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificates (PEM) to trust for an https:// --api, besides the
    /// system's roots.
    #[arg(long, global = true)]
    ca_file: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole upgrade on this machine: platform, embedded broker, simulated devices.
    Demo(demo::DemoArgs),
    /// Run N simulated devices (one MQTT connection each, the SDK's engine
    /// and download) through one batch, and print what it took.
    Fleet(fleet::FleetArgs),
    /// Run the platform service (until Ctrl-C).
    Platform(PlatformArgs),
    /// Firmware registry.
    Firmware {
        #[command(flatten)]
        api: ApiOpts,
        #[command(subcommand)]
        cmd: commands::FirmwareCmd,
    },
    /// Batch upgrades.
    Batch {
        #[command(flatten)]
        api: ApiOpts,
        #[command(subcommand)]
        cmd: commands::BatchCmd,
    },
    /// Devices: list the known ones, or run the device agent.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Manifest signing keys.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// Write a new Ed25519 signing key pair: DIR/signing-key.pem (private,
    /// for `iot-ota platform --signing-key`) and DIR/signing-key.pub.pem
    /// (public, for the devices' `--trust-key`).
    Generate {
        /// Where the two files go (an existing private key is not overwritten).
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per run: size does not matter
enum DeviceCmd {
    /// Register devices (or give registered ones new secrets): prints each
    /// one's MQTT user name and secret, once.
    Add {
        #[command(flatten)]
        api: ApiOpts,
        /// Product key.
        #[arg(long, visible_alias = "product-key")]
        product: String,
        /// Device names (repeat the flag, or give a comma-separated list).
        #[arg(
            long = "device",
            visible_alias = "device-name",
            required = true,
            value_delimiter = ','
        )]
        devices: Vec<String>,
    },
    /// Revoke a device's credential: the embedded broker closes its
    /// connection and refuses it from now on.
    Revoke {
        #[command(flatten)]
        api: ApiOpts,
        /// Product key.
        #[arg(long, visible_alias = "product-key")]
        product: String,
        /// Device name.
        #[arg(long, visible_alias = "device-name")]
        device: String,
    },
    /// Devices: registered ones and those known from their version informs.
    List {
        #[command(flatten)]
        api: ApiOpts,
        /// Only this product.
        #[arg(long, visible_alias = "product-key")]
        product: Option<String>,
    },
    /// Run the device agent: receive upgrades, download, verify, install, report.
    Run(agent::AgentArgs),
}

/// `iot-ota platform`.
#[derive(Args, Debug)]
struct PlatformArgs {
    /// Database and firmware files.
    #[arg(long, default_value = "iot-ota-data")]
    data_dir: PathBuf,
    /// HTTP listen address: the API and the firmware files.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Base URL put in upgrade commands, when devices reach this server by another name.
    #[arg(long)]
    public_url: Option<String>,
    /// Use this external broker (mqtt://HOST:PORT or mqtts://HOST:PORT) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// Listen address of the embedded broker.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// MQTT username for an external broker.
    #[arg(long)]
    mqtt_username: Option<String>,
    /// MQTT password for an external broker.
    #[arg(long, env = "IOT_OTA_MQTT_PASSWORD")]
    mqtt_password: Option<String>,
    /// CA certificates (PEM) for mqtts://, trusted besides the system's roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Topic prefix.
    #[arg(long, default_value = "/sys")]
    topic_prefix: String,
    /// Also serve the API and the firmware over HTTPS on this address (needs --tls-cert, --tls-key);
    /// command URLs then default to https://.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    https: Option<SocketAddr>,
    /// Server certificate chain (PEM) for --https.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM) for --https.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Largest firmware accepted, bytes (default 100 MiB).
    #[arg(long, default_value_t = iot_ota_platform::api::DEFAULT_MAX_FIRMWARE_SIZE)]
    max_firmware_size: u64,
    /// Sign each uploaded firmware's manifest with this key (PKCS#8 PEM,
    /// from `iot-ota key generate`): commands and get replies carry it.
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// Let anyone use the embedded broker, to every topic (development
    /// only). By default only devices registered with `iot-ota device add`
    /// get in, each to its own topics.
    #[arg(long)]
    mqtt_anonymous: bool,
    /// How long the embedded broker keeps a persistent session once its
    /// client is gone, in seconds (as MQTT 5's session expiry; 0: it ends
    /// with its connection). Default a week.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    mqtt_session_expiry: u64,
    /// Persistent sessions the embedded broker keeps with their clients
    /// away, at most; past it the one away longest goes.
    #[arg(long, default_value_t = 100_000)]
    mqtt_max_kept_sessions: usize,
}

async fn run_platform(a: PlatformArgs) -> Result<(), String> {
    let mut config = iot_ota_platform::PlatformConfig::new(&a.data_dir);
    config.http_addr = a.http;
    config.public_url = a.public_url;
    config.broker = match a.broker {
        Some(url) => iot_ota_platform::BrokerChoice::External(url),
        None => iot_ota_platform::BrokerChoice::Embedded(a.mqtt_listen),
    };
    config.mqtt_username = a.mqtt_username;
    config.mqtt_password = a.mqtt_password;
    config.ca_file = a.ca_file;
    config.topic_prefix = a.topic_prefix;
    config.max_firmware_size = a.max_firmware_size;
    config.https_addr = a.https;
    config.tls_cert = a.tls_cert;
    config.tls_key = a.tls_key;
    config.signing_key = a.signing_key;
    config.mqtt_anonymous = a.mqtt_anonymous;
    config.broker_options.session_expiry = std::time::Duration::from_secs(a.mqtt_session_expiry);
    config.broker_options.max_kept_sessions = a.mqtt_max_kept_sessions;
    let platform = iot_ota_platform::Platform::start(config).await?;
    if platform.is_open() {
        eprintln!(
            "iot-ota platform: WARNING: the embedded MQTT broker is open (--mqtt-anonymous): \
             anyone who reaches it may read every device's commands and report for any device"
        );
    }
    if platform.token_made() {
        println!(
            "iot-ota platform: API token {} (shown once; kept in {})",
            platform.api_token(),
            a.data_dir
                .join(iot_ota_platform::token::TOKEN_FILE)
                .display()
        );
    }
    println!(
        "iot-ota platform: API {} | firmware URLs {} | broker {} | data {}",
        platform.api_url(),
        platform.public_url(),
        platform.broker_url(),
        a.data_dir.display()
    );
    tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
    println!("stopping");
    platform.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init(cli.verbose);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("iot-ota: {e}");
            return ExitCode::FAILURE;
        }
    };
    // With --json, errors are JSON too.
    let json = match &cli.command {
        Command::Firmware { api, .. } | Command::Batch { api, .. } => api.json,
        Command::Device {
            cmd: DeviceCmd::List { api, .. },
        } => api.json,
        Command::Fleet(args) => args.json,
        _ => false,
    };
    let result: Result<ExitCode, String> = rt.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Fleet(args) => fleet::run(args).await,
            Command::Platform(args) => run_platform(args).await.map(|_| ExitCode::SUCCESS),
            Command::Key {
                cmd: KeyCmd::Generate { out_dir },
            } => iot_ota_platform::signing::generate_files(&out_dir).map(|key| {
                use iot_ota_core::manifest::Signer;
                println!(
                    "wrote {} (keep it secret) and {} (pin it on the devices)\nkey id {}",
                    out_dir.join("signing-key.pem").display(),
                    out_dir.join("signing-key.pub.pem").display(),
                    key.key_id()
                );
                ExitCode::SUCCESS
            }),
            Command::Firmware { api, cmd } => commands::firmware(&api, cmd).await,
            Command::Batch { api, cmd } => commands::batch(&api, cmd).await,
            Command::Device { cmd } => match cmd {
                DeviceCmd::List { api, product } => commands::devices(&api, product).await,
                DeviceCmd::Add {
                    api,
                    product,
                    devices,
                } => commands::add_devices(&api, &product, &devices).await,
                DeviceCmd::Revoke {
                    api,
                    product,
                    device,
                } => commands::revoke_device(&api, &product, &device).await,
                DeviceCmd::Run(args) => agent::run(args).await,
            },
        }
    });
    match result {
        Ok(code) => code,
        Err(e) if json => {
            println!("{}", serde_json::json!({ "error": e }));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("iot-ota: {e}");
            ExitCode::FAILURE
        }
    }
}
