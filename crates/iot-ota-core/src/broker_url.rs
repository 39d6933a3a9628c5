//! Broker URLs: `mqtt://HOST:PORT` and `mqtts://HOST:PORT`, shared by the
//! device SDK and the platform so both read a URL the same way.

/// Where the MQTT broker is: parsed from `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// True for `mqtts://` (also `ssl://`, `tls://`).
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port: explicit, or 1883 / 8883.
    pub port: u16,
}

impl BrokerUrl {
    /// Parses a broker URL: `mqtt://`, `tcp://` (plain) or `mqtts://`, `ssl://`,
    /// `tls://` (TLS); the port defaults to 1883 or 8883.
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let bad = |why: &str| format!("broker URL {url:?}: {why}");
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected mqtt://HOST:PORT or mqtts://HOST:PORT"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" | "tls" => true,
            other => return Err(bad(&format!("unsupported scheme {other:?}"))),
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('@') {
            return Err(bad("only HOST:PORT may follow the scheme"));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            match after.strip_prefix(':') {
                Some(p) => (h, p),
                None if after.is_empty() => (h, ""),
                None => return Err(bad("junk after the IPv6 address")),
            }
        } else {
            authority.rsplit_once(':').unwrap_or((authority, ""))
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = if port.is_empty() {
            default_port
        } else {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(bad(&format!("invalid port {port:?}"))),
            }
        };
        Ok(BrokerUrl {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b = BrokerUrl::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((b.tls, b.host.as_str(), b.port), (false, "127.0.0.1", 1884));
        let b = BrokerUrl::parse("mqtts://broker.local").unwrap();
        assert_eq!((b.tls, b.port), (true, 8883));
        let b = BrokerUrl::parse("ssl://broker.local:1").unwrap();
        assert_eq!((b.tls, b.port), (true, 1));
        let b = BrokerUrl::parse("tcp://[::1]:1000/").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 1000));
        for bad in [
            "127.0.0.1:1883",
            "http://h:1",
            "mqtt://:1",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u@h",
            "mqtt://h/path",
        ] {
            let e = BrokerUrl::parse(bad).unwrap_err();
            assert!(e.contains("broker URL"), "{bad}: {e}");
        }
    }
}
