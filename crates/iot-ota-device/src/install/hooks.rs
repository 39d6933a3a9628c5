//! Command hooks: each step of the install is a shell command, as Mender's
//! state scripts are.
//!
//! Each command runs with `sh -c`. `{file}` and `{version}` in it are
//! replaced by their values in POSIX single quotes (a `'` inside becomes
//! `'\''`), so each is always one word and never shell syntax: write
//! `{file}`, not `"{file}"`. The same values are in the environment as
//! `OTA_FILE` and `OTA_VERSION`. Exit status 0 is success; anything else
//! fails the step with the status and the end of stderr.
//!
//! | step | default | `{version}` |
//! |---|---|---|
//! | install | (required) | the target |
//! | reboot | `systemctl reboot` | the target |
//! | health check | none: healthy | the running version |
//! | commit | none | the running version |
//! | rollback | none | the running version |
//!
//! With no reboot command ([`CommandHooks::with_reboot`] with `None`), the
//! install takes effect at once (an application updated in place).

use std::path::Path;
use std::process::{Command, Stdio};

use iot_ota_core::journal::Health;

use super::Installer;

/// The default reboot: what a systemd device does.
pub const DEFAULT_REBOOT: &str = "systemctl reboot";

/// How long a health check may take before it counts as failed.
pub const DEFAULT_HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Install steps as shell commands.
#[derive(Debug, Clone)]
pub struct CommandHooks {
    install: String,
    reboot: Option<String>,
    health: Option<String>,
    commit: Option<String>,
    rollback: Option<String>,
    running: String,
    /// Installed in place: the version that ran before, for a rollback.
    previous: Option<String>,
    /// Where an in-place install records the version that runs now.
    version_file: Option<std::path::PathBuf>,
}

impl CommandHooks {
    /// Hooks around the install command `install`, on a device that runs
    /// `running_version` now (read from the running image: its version
    /// file, say). Reboots with [`DEFAULT_REBOOT`].
    pub fn new(install: impl Into<String>, running_version: impl Into<String>) -> CommandHooks {
        CommandHooks {
            install: install.into(),
            reboot: Some(DEFAULT_REBOOT.to_owned()),
            health: None,
            commit: None,
            rollback: None,
            running: running_version.into(),
            previous: None,
            version_file: None,
        }
    }

    /// With an install in place (no reboot), the file that holds the
    /// running version: rewritten atomically as soon as the new version
    /// runs (and again if it is rolled back), before the journal moves on,
    /// so that a crash never leaves it naming the other version.
    pub fn with_version_file(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.version_file = path;
        self
    }

    fn record_running(&self) -> Result<(), String> {
        match &self.version_file {
            Some(f) => crate::fsutil::write_atomic(f, format!("{}\n", self.running).as_bytes())
                .map_err(|e| format!("writing {}: {e}", f.display())),
            None => Ok(()),
        }
    }

    /// The reboot command; `None`: the install needs no reboot.
    pub fn with_reboot(mut self, command: Option<String>) -> Self {
        self.reboot = command.filter(|c| !c.trim().is_empty());
        self
    }

    /// The health-check command (exit 0: healthy).
    pub fn with_health(mut self, command: Option<String>) -> Self {
        self.health = command;
        self
    }

    /// The commit command (mark the running slot good).
    pub fn with_commit(mut self, command: Option<String>) -> Self {
        self.commit = command;
        self
    }

    /// The rollback command (mark the new slot bad, make the old one boot).
    pub fn with_rollback(mut self, command: Option<String>) -> Self {
        self.rollback = command;
        self
    }
}

/// Runs `template` with `sh -c`; `Err` carries the status and stderr's end.
pub(crate) fn run(
    step: &str,
    template: &str,
    file: Option<&Path>,
    version: &str,
) -> Result<(), String> {
    let (cmd, command) = shell_command(template, file, version);
    finish(step, cmd, command)
}

/// [`run`] with no file and extra environment variables.
fn run_with(step: &str, template: &str, version: &str, env: &[(&str, &str)]) -> Result<(), String> {
    let (cmd, mut command) = shell_command(template, None, version);
    command.envs(env.iter().copied());
    finish(step, cmd, command)
}

fn finish(step: &str, cmd: String, command: Command) -> Result<(), String> {
    finish_within(step, cmd, command, None)
}

/// Runs `command`; with a `timeout`, one that has not ended by then is
/// killed (the process we started, by its handle) and fails.
fn finish_within(
    step: &str,
    cmd: String,
    mut command: Command,
    timeout: Option<std::time::Duration>,
) -> Result<(), String> {
    log::info!("{step}: running {cmd:?}");
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the {step} command {cmd:?}: {e}"))?;
    // Read stderr on a thread, so that a chatty command never blocks on a
    // full pipe while we wait for it.
    let mut pipe = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(p) = pipe.as_mut() {
            let _ = std::io::Read::read_to_end(p, &mut text);
        }
        text
    });
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for the {step} command {cmd:?}: {e}")),
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            // Its own children may hold stderr open: do not wait for them.
            drop(reader);
            let secs = timeout.map_or(0.0, |t| t.as_secs_f64());
            return Err(format!("{step} command timed out after {secs} s"));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let stderr = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&stderr);
    let stderr = stderr.trim();
    let mut start = stderr.len().saturating_sub(200);
    while !stderr.is_char_boundary(start) {
        start += 1;
    }
    let code = status
        .code()
        .map_or_else(|| "a signal".to_string(), |c| c.to_string());
    Err(format!(
        "{step} command exited with status {code}: {}",
        &stderr[start..]
    ))
}

impl Installer for CommandHooks {
    fn name(&self) -> &str {
        "commands"
    }

    fn running_version(&mut self) -> Result<String, String> {
        Ok(self.running.clone())
    }

    fn install(
        &mut self,
        image: &Path,
        version: &str,
        progress: &mut dyn FnMut(u32),
    ) -> Result<(), String> {
        progress(0);
        run("install", &self.install, Some(image), version)?;
        progress(100);
        if self.reboot.is_none() {
            self.previous = Some(std::mem::replace(&mut self.running, version.to_owned()));
            self.record_running()?;
        }
        Ok(())
    }

    fn needs_reboot(&self) -> bool {
        self.reboot.is_some()
    }

    fn reboot(&mut self) -> Result<(), String> {
        reboot_command(self.reboot.as_deref(), &self.running)
    }

    fn health_check(&mut self) -> Health {
        self.health.as_deref().map_or(Health::Good, |cmd| {
            health_command(cmd, &self.running, DEFAULT_HEALTH_TIMEOUT)
        })
    }

    fn commit(&mut self) -> Result<(), String> {
        match &self.commit {
            Some(cmd) => run("commit", cmd, None, &self.running),
            None => Ok(()),
        }
    }

    /// Runs the rollback command; `OTA_NEW_IMAGE_RUNNING` is `1` when the
    /// bad image runs (its health check failed), `0` when the old one does.
    fn roll_back(&mut self, new_image_running: bool) -> Result<(), String> {
        let flag = if new_image_running { "1" } else { "0" };
        if let Some(cmd) = &self.rollback {
            run_with(
                "rollback",
                cmd,
                &self.running,
                &[("OTA_NEW_IMAGE_RUNNING", flag)],
            )?;
        }
        // In place, the rollback brings the previous version back at once.
        if self.reboot.is_none() {
            if let Some(previous) = self.previous.take() {
                self.running = previous;
                self.record_running()?;
            }
        }
        Ok(())
    }
}

/// Runs the reboot command, if any (`None`: nothing to do).
pub(crate) fn reboot_command(cmd: Option<&str>, version: &str) -> Result<(), String> {
    cmd.map_or(Ok(()), |cmd| run("reboot", cmd, None, version))
}

/// A health check as a shell command: exit 0 is healthy; anything else is
/// [`Health::Bad`] with the end of its stderr and its exit status.
/// `{version}` is the running version.
/// One that has not ended within `timeout` is killed and is unhealthy.
pub fn health_command(cmd: &str, version: &str, timeout: std::time::Duration) -> Health {
    let (line, command) = shell_command(cmd, None, version);
    match finish_within("health check", line, command, Some(timeout)) {
        Ok(()) => Health::Good,
        // The journal says "health check failed: " already.
        Err(why) => Health::Bad(
            why.strip_prefix("health check command ")
                .unwrap_or(&why)
                .to_owned(),
        ),
    }
}

/// `s` as one POSIX shell word: in single quotes, each `'` written `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command line for `sh -c`: `{file}` and `{version}` replaced, in one
/// pass, by their shell-quoted values (a `{file}` with no file stays as it
/// is); the values are also in the environment as `OTA_FILE` and
/// `OTA_VERSION`. Returns the line and the command, stdin closed.
pub fn shell_command(template: &str, file: Option<&Path>, version: &str) -> (String, Command) {
    let file_text = file.map(|f| f.to_string_lossy());
    let mut cmd = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        cmd.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let (Some(after), Some(f)) = (tail.strip_prefix("{file}"), &file_text) {
            cmd.push_str(&shell_quote(f));
            rest = after;
            continue;
        }
        if let Some(after) = tail.strip_prefix("{version}") {
            cmd.push_str(&shell_quote(version));
            rest = after;
        } else {
            cmd.push('{');
            rest = &tail[1..];
        }
    }
    cmd.push_str(rest);
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&cmd)
        .env("OTA_VERSION", version)
        .stdin(Stdio::null());
    if let Some(f) = file {
        command.env("OTA_FILE", f);
    }
    (cmd, command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        let (cmd, _) = shell_command("x {file} {version} {other} {", Some(Path::new("/f")), "1.0");
        assert_eq!(cmd, "x '/f' '1.0' {other} {");
        // One pass: a `{version}` inside the file name is not replaced.
        let (cmd, _) = shell_command("{file}", Some(Path::new("/w/{version}")), "9");
        assert_eq!(cmd, "'/w/{version}'");
        let (cmd, _) = shell_command("echo {file}", None, "9");
        assert_eq!(cmd, "echo {file}");
    }

    /// Hostile values reach the command as plain words and in the
    /// environment, and run nothing of their own.
    #[test]
    fn values_are_not_shell_syntax() {
        let dir = std::env::temp_dir().join(format!("iot-ota-hooks-sh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let template = format!(
            "printf '%s\\n' {{version}} {{file}} \"$OTA_VERSION\" \"$OTA_FILE\" > {}",
            shell_quote(&out.to_string_lossy())
        );
        let pwned = |n: u32| format!("pwned{n}");
        let versions = [
            format!("1;touch$IFS{}", pwned(1)),
            format!("1' ; touch {} ; echo '", pwned(2)),
            format!("$(touch {})`touch {}`", pwned(3), pwned(4)),
            format!("1\n touch {} \\' \"", pwned(5)),
        ];
        for (i, version) in versions.iter().enumerate() {
            let image = dir.join(format!("it's a file; $(touch {}) {i}.bin", pwned(6)));
            let (_, mut command) = shell_command(&template, Some(&image), version);
            let status = command.current_dir(&dir).status().unwrap();
            assert!(status.success(), "{version:?}");
            let file = image.to_string_lossy();
            let expected = format!("{version}\n{file}\n{version}\n{file}\n");
            assert_eq!(std::fs::read_to_string(&out).unwrap(), expected);
        }
        let made: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("pwned"))
            .collect();
        assert!(made.is_empty(), "the shell ran injected commands: {made:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_step_runs_its_command_and_reports_failures() {
        let dir = std::env::temp_dir().join(format!("iot-ota-hooks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = shell_quote(&dir.join("log").to_string_lossy());
        let step = |name: &str| Some(format!("echo {name} {{version}} >> {log}"));
        let mut hooks = CommandHooks::new(format!("echo install {{version}} >> {log}"), "1.0")
            .with_reboot(None)
            .with_health(Some("echo sick >&2; exit 4".into()))
            .with_commit(step("commit"))
            .with_rollback(step("rollback"));
        assert!(!hooks.needs_reboot());
        hooks
            .install(Path::new("/img"), "2.0", &mut |_| {})
            .unwrap();
        assert_eq!(
            hooks.running_version().unwrap(),
            "2.0",
            "no reboot: runs at once"
        );
        assert_eq!(
            hooks.health_check(),
            Health::Bad("exited with status 4: sick".into())
        );
        hooks.roll_back(true).unwrap();
        assert_eq!(
            hooks.running_version().unwrap(),
            "1.0",
            "rolled back in place"
        );
        hooks.commit().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("log")).unwrap(),
            "install 2.0\nrollback 2.0\ncommit 1.0\n"
        );
        let slow = health_command("sleep 5", "1.0", std::time::Duration::from_millis(200));
        assert_eq!(
            slow,
            Health::Bad("timed out after 0.2 s".into()),
            "a hung health check fails"
        );
        let mut failing = CommandHooks::new("exit 3", "1.0");
        assert!(failing.needs_reboot(), "systemctl reboot by default");
        let e = failing
            .install(Path::new("/img"), "2.0", &mut |_| {})
            .unwrap_err();
        assert!(e.contains("status 3"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
