//! Who may connect to the embedded broker, and to which topics.
//!
//! Every CONNECT is put to the [`Authenticator`] the broker was started
//! with ([`super::BrokerOptions::auth`]): it says who the client is (an
//! [`Identity`]) or refuses it (CONNACK 0x05, "not authorized"). A device
//! may then subscribe to and publish on its own topics only
//! (`{prefix}/{product}/{device}/...`, PROTOCOL.md); the platform's own
//! client may use every topic. A refused SUBSCRIBE filter gets 0x80, a
//! refused PUBLISH is dropped (and acknowledged, as Mosquitto does for MQTT
//! 3.1.1) and counted. Without an authenticator the broker is open (the
//! platform's `--mqtt-anonymous`, for development).

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The platform's own client: every topic.
    Platform,
    /// One registered device: only the topics under `root`.
    Device {
        /// Its product key.
        product: String,
        /// Its device name.
        device: String,
        /// `{prefix}/{product}/{device}/`: every topic and filter it uses
        /// begins with this.
        root: String,
    },
    /// A client of an open broker (no authenticator): every topic.
    Anonymous,
}

impl Identity {
    /// A device's identity under the topic `prefix` (`/sys`).
    pub fn device(prefix: &str, product: &str, device: &str) -> Identity {
        Identity::Device {
            product: product.to_owned(),
            device: device.to_owned(),
            root: format!("{prefix}/{product}/{device}/"),
        }
    }

    /// Whether this client may publish on `topic`, or subscribe to the
    /// filter `topic` (a device's filter must lie wholly under its root:
    /// wildcards only after it).
    pub fn may_use(&self, topic: &str) -> bool {
        match self {
            Identity::Platform | Identity::Anonymous => true,
            Identity::Device { root, .. } => topic.len() > root.len() && topic.starts_with(root),
        }
    }
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials, or wrong ones, or revoked: CONNACK 0x05.
    NotAuthorized(String),
}

/// Decides who a CONNECT is. Called once per connection, on the broker's
/// tasks: it must be quick (a map lookup and a hash, not a database query).
pub trait Authenticator: Send + Sync + std::fmt::Debug {
    /// The identity of a client that sent `username` and `password`.
    fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Identity, Refusal>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_uses_only_its_own_topics() {
        let d = Identity::device("/sys", "pk", "dev1");
        assert!(d.may_use("/sys/pk/dev1/ota/firmware/upgrade"));
        assert!(d.may_use("/sys/pk/dev1/#"));
        assert!(d.may_use("/sys/pk/dev1/+/progress"));
        for other in [
            "#",
            "/sys/#",
            "/sys/pk/+/ota/firmware/upgrade",
            "/sys/pk/dev2/ota/inform",
            "/sys/pk/dev1",
            "/sys/pk/dev1/",
            "/sys/pk/dev10/ota/inform",
            "+/pk/dev1/ota/inform",
        ] {
            assert!(!d.may_use(other), "{other}");
        }
        assert!(Identity::Platform.may_use("#"));
        assert!(Identity::Anonymous.may_use("/sys/pk/dev2/ota/inform"));
    }
}
