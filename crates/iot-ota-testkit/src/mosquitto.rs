//! The real Mosquitto broker, on 127.0.0.1 and a free port.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{TempDir, TestCa};

/// How long a broker gets to accept connections after it is spawned.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// A Mosquitto broker process owned by the test.
///
/// It listens on 127.0.0.1 only, keeps nothing on disk between runs
/// (`persistence false`) and logs to `mosquitto.log` in its own temp dir.
/// Dropping it kills the process and waits for it.
///
/// The binary is found through the `MOSQUITTO` environment variable, then
/// `PATH`, then `/usr/sbin/mosquitto` (where Debian puts it, outside a
/// normal user's `PATH`).
pub struct Mosquitto {
    child: Option<Child>,
    binary: PathBuf,
    port: u16,
    tls: bool,
    config: PathBuf,
    log: PathBuf,
    // Last, so that the files outlive the process on drop.
    dir: TempDir,
}

/// How to configure a [`Mosquitto`] beyond the plain defaults.
#[derive(Default)]
pub struct MosquittoOptions {
    tls: Option<TlsFiles>,
    require_client_cert: bool,
    auth: Vec<(String, String)>,
    acl: Option<String>,
}

struct TlsFiles {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl MosquittoOptions {
    /// Plain MQTT, anonymous clients allowed.
    pub fn new() -> Self {
        Self::default()
    }

    /// A TLS listener presenting `ca`'s `localhost` certificate.
    pub fn tls(mut self, ca: &TestCa) -> Self {
        self.tls = Some(TlsFiles {
            ca_pem: ca.ca_pem(),
            cert_pem: ca.server_cert_pem(),
            key_pem: ca.server_key_pem(),
        });
        self
    }

    /// With [`MosquittoOptions::tls`]: clients must present a certificate
    /// signed by the CA (see [`TestCa::client_cert`]).
    pub fn require_client_cert(mut self) -> Self {
        self.require_client_cert = true;
        self
    }

    /// Only `user` with `password` may connect. Needs `mosquitto_passwd`
    /// (`MOSQUITTO_PASSWD`, `PATH`, or beside the broker binary); without
    /// it [`MosquittoOptions::start`] returns an error.
    pub fn auth(mut self, user: &str, password: &str) -> Self {
        self.auth.push((user.to_string(), password.to_string()));
        self
    }

    /// The ACL file's text (Mosquitto's `acl_file`: `user`, `topic` and
    /// `pattern` lines).
    pub fn acl(mut self, text: &str) -> Self {
        self.acl = Some(text.to_string());
        self
    }

    /// Spawns the broker and waits until it accepts TCP connections.
    pub fn start(self) -> io::Result<Mosquitto> {
        let binary = find_binary(
            "MOSQUITTO",
            "mosquitto",
            &[Path::new("/usr/sbin/mosquitto")],
        )
        .ok_or_else(|| {
            not_found("mosquitto not found (set MOSQUITTO, or install the mosquitto package)")
        })?;
        let dir = TempDir::new("testkit-mosquitto");
        let port = crate::free_port();
        let config = dir.join("mosquitto.conf");
        std::fs::write(&config, self.config_text(&binary, &dir, port)?)?;
        let mut broker = Mosquitto {
            child: None,
            binary,
            port,
            tls: self.tls.is_some(),
            config,
            log: dir.join("mosquitto.log"),
            dir,
        };
        broker.spawn_and_wait()?;
        Ok(broker)
    }

    /// The configuration file's text; writes the files it refers to.
    fn config_text(&self, binary: &Path, dir: &TempDir, port: u16) -> io::Result<String> {
        // The log goes to stderr, which the child writes into a file we
        // opened: a broker started as root drops to the `mosquitto` user and
        // could not create a log file in our root-owned temp dir itself.
        let mut text = format!(
            "listener {port} 127.0.0.1\n\
             persistence false\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             log_timestamp true\n\
             connection_messages true\n"
        );
        if let Some(tls) = &self.tls {
            let files = [
                ("cafile", "ca.crt", &tls.ca_pem),
                ("certfile", "server.crt", &tls.cert_pem),
                ("keyfile", "server.key", &tls.key_pem),
            ];
            for (key, name, pem) in files {
                let path = dir.join(name);
                std::fs::write(&path, pem)?;
                text.push_str(&format!("{key} {}\n", path.display()));
            }
            text.push_str(&format!(
                "require_certificate {}\n",
                self.require_client_cert
            ));
        }
        if self.auth.is_empty() {
            text.push_str("allow_anonymous true\n");
        } else {
            let file = dir.join("passwd");
            File::create(&file)?;
            for (user, password) in &self.auth {
                make_password_file(binary, &file, user, password)?;
            }
            text.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                file.display()
            ));
        }
        if let Some(acl) = &self.acl {
            let file = dir.join("acl");
            std::fs::write(&file, acl)?;
            text.push_str(&format!("acl_file {}\n", file.display()));
        }
        Ok(text)
    }
}

impl Mosquitto {
    /// Starts a plain broker; panics with the broker's log if it cannot.
    pub fn start() -> Mosquitto {
        MosquittoOptions::new()
            .start()
            .unwrap_or_else(|e| panic!("cannot start mosquitto: {e}"))
    }

    /// Starts a broker with a TLS listener using `ca`'s `localhost`
    /// certificate; [`Mosquitto::url`] is then `mqtts://localhost:PORT`.
    pub fn start_tls(ca: &TestCa) -> Mosquitto {
        MosquittoOptions::new()
            .tls(ca)
            .start()
            .unwrap_or_else(|e| panic!("cannot start mosquitto (TLS): {e}"))
    }

    /// Starts a broker that admits only `user` with `password`.
    ///
    /// Returns an error (kind `NotFound`) when `mosquitto_passwd` is absent,
    /// so a test can skip rather than fail.
    pub fn start_with_auth(user: &str, password: &str) -> io::Result<Mosquitto> {
        MosquittoOptions::new().auth(user, password).start()
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`, or `mqtts://localhost:PORT` with TLS (the
    /// name the server certificate is issued to).
    pub fn url(&self) -> String {
        if self.tls {
            format!("mqtts://localhost:{}", self.port)
        } else {
            format!("mqtt://127.0.0.1:{}", self.port)
        }
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has been spawned and has not exited.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Everything the broker has logged so far (all runs of it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The broker's temp dir (its config, log and certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the broker (SIGKILL: clients see the connection drop, as after
    /// a crash) and waits for it to exit. Does nothing if it is stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker and starts it again on the same port, with the
    /// same configuration; returns once it accepts connections again.
    /// Panics with the broker's log if it does not come back.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait()
            .unwrap_or_else(|e| panic!("cannot restart mosquitto: {e}"));
    }

    fn spawn_and_wait(&mut self) -> io::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot run {}: {e}", self.binary.display()),
                )
            })?;
        self.child = Some(child);
        self.wait_accepting()
    }

    /// Polls until the port accepts a TCP connection, the process exits, or
    /// the deadline passes; the error carries the broker's log.
    fn wait_accepting(&mut self) -> io::Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(self.failure(&format!("mosquitto exited early ({status})")));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(self.failure(&format!(
                    "mosquitto did not accept connections on {addr} within {READY_DEADLINE:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn failure(&self, what: &str) -> io::Error {
        io::Error::other(format!(
            "{what}\n--- {} ---\n{}\n--- {} ---\n{}",
            self.config.display(),
            std::fs::read_to_string(&self.config).unwrap_or_default(),
            self.log.display(),
            self.log()
        ))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a password file for one user with `mosquitto_passwd -b`.
/// Adds `user` to the password `file` (which must exist).
fn make_password_file(broker: &Path, file: &Path, user: &str, password: &str) -> io::Result<()> {
    let beside = broker.with_file_name("mosquitto_passwd");
    let fallbacks = [
        beside.as_path(),
        Path::new("/usr/bin/mosquitto_passwd"),
        Path::new("/usr/sbin/mosquitto_passwd"),
    ];
    let tool = find_binary("MOSQUITTO_PASSWD", "mosquitto_passwd", &fallbacks)
        .ok_or_else(|| not_found("mosquitto_passwd not found: password auth unavailable"))?;
    // An empty file first (the caller's), then `-b` without `-c`: the one
    // form every 1.x and 2.x version accepts.
    let out = Command::new(&tool)
        .arg("-b")
        .arg(file)
        .arg(user)
        .arg(password)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{} failed ({}): {}",
            tool.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// `$env_var`, else `name` on `PATH`, else the first fallback that exists.
fn find_binary(env_var: &str, name: &str, fallbacks: &[&Path]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name));
    on_path
        .chain(fallbacks.iter().map(|p| p.to_path_buf()))
        .find(|p| p.is_file())
}

fn not_found(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_binary_prefers_env_then_fallback() {
        let missing = Path::new("/nonexistent/definitely-not-here");
        assert_eq!(
            find_binary(
                "TESTKIT_UNSET_VAR_XYZ",
                "definitely-not-a-binary-xyz",
                &[missing]
            ),
            None
        );
        let sh = Path::new("/bin/sh");
        assert_eq!(
            find_binary(
                "TESTKIT_UNSET_VAR_XYZ",
                "definitely-not-a-binary-xyz",
                &[missing, sh]
            ),
            Some(sh.to_path_buf())
        );
    }
}
