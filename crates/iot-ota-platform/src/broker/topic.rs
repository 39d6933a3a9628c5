//! MQTT 3.1.1 topic names and filters (spec 4.7): validation and matching.

/// A topic a client may publish to: not empty, no wildcards, no NUL.
pub(crate) fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A filter a client may subscribe to: not empty, no NUL, `+` and `#` each
/// alone in their level, `#` only last.
pub(crate) fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if !last => return false,
            "#" | "+" => {}
            l if l.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// True when `filter` has a wildcard (so it cannot be found by an exact lookup).
pub(crate) fn is_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// Whether `topic` matches `filter`. Topics beginning with `$` are not
/// matched by a filter that begins with a wildcard (spec 4.7.2).
pub(crate) fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_validated_per_level() {
        for ok in [
            "a",
            "a/b",
            "+",
            "#",
            "a/+/c",
            "a/#",
            "+/+",
            "/",
            "/a/+",
            "sport/+/#",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+/b", "a/b+", "#/a", "a\0b", "++"] {
            assert!(!valid_filter(bad), "{bad}");
        }
        assert!(valid_topic("/ota/device/upgrade/pk/dn"));
        for bad in ["", "a/+", "a/#", "a\0"] {
            assert!(!valid_topic(bad), "{bad}");
        }
    }

    #[test]
    fn wildcards_match_as_the_spec_says() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/+", "a/", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/a", true),
            ("+", "/a", false),
            (
                "/ota/device/progress/+/+",
                "/ota/device/progress/pk/dn",
                true,
            ),
            ("/ota/device/progress/+/+", "/ota/device/progress/pk", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b/c", "a/b", false),
            ("a/b", "a/b/c", false),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(matches(filter, topic), want, "{filter} vs {topic}");
        }
    }
}
