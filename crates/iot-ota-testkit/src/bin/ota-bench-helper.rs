//! Helper for `bench/download.sh`: serve one file over HTTP and HTTPS from
//! one process, or publish one MQTT message.
//!
//! ```text
//! ota-bench-helper serve FILE CA_OUT   prints "HTTP_URL HTTPS_URL" on stdout, writes the
//!                                      CA certificate to CA_OUT, serves until stdin closes
//! ota-bench-helper publish BROKER_URL TOPIC PAYLOAD   QoS 1, waits for the PUBACK
//! ```

use std::io::{BufRead, Write};

use iot_ota_testkit::{FileServer, Route, TestCa, WireRecorder};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", file, ca_out] => serve(file, ca_out),
        ["publish", broker, topic, payload] => {
            // The recorder subscribes to a topic nobody uses; it is only a publisher here.
            let client = WireRecorder::connect(broker, "/ota-bench-helper/unused");
            client
                .publish(topic, payload.as_bytes().to_vec(), true)
                .unwrap_or_else(|e| fail(&format!("publish: {e}")));
        }
        _ => fail("usage: ota-bench-helper serve FILE CA_OUT | publish BROKER_URL TOPIC PAYLOAD"),
    }
}

fn serve(file: &str, ca_out: &str) {
    let ca = TestCa::new();
    std::fs::write(ca_out, ca.ca_pem()).unwrap_or_else(|e| fail(&format!("{ca_out}: {e}")));
    let plain = FileServer::start();
    let tls = FileServer::start_tls(&ca);
    let http = plain.add("/fw.bin", Route::path(file));
    let https = tls.add("/fw.bin", Route::path(file));
    println!("{http} {https}");
    std::io::stdout().flush().ok();
    // Serve until the script closes our stdin (or exits).
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("ota-bench-helper: {msg}");
    std::process::exit(2)
}
