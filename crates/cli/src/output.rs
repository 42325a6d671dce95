//! Human-readable tables and JSON output.

use chrono::{DateTime, Utc};
use forkvm_api::wire::{ForkOutcome, Image, Instance, Snapshot};
use serde::Serialize;

/// Pretty JSON on stdout.
/// Structured output as YAML instead of JSON (`--format yaml`), set once
/// at start: every command's structured output goes through [`print_json`].
pub static YAML: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// The structured form of `v`: pretty JSON, or YAML with `--format yaml`.
pub fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    if YAML.get().copied().unwrap_or(false) {
        print!("{}", serde_yaml_ng::to_string(v)?);
    } else {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

/// Compact age: "42s", "5m", "3h", "2d".
pub fn age(created: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - created).num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Text that may come from a guest (console lines in errors, names a guest
/// reported) made safe for a terminal: control characters other than
/// newline and tab, and the C1 range, shown escaped (`\u{1b}`), so a
/// guest cannot send escape sequences to the operator's terminal.
pub fn safe(s: &str) -> std::borrow::Cow<'_, str> {
    let bad =
        |c: char| (c.is_control() && c != '\n' && c != '\t') || ('\u{80}'..='\u{9f}').contains(&c);
    if !s.chars().any(bad) {
        return s.into();
    }
    s.chars()
        .map(|c| match bad(c) {
            true => c.escape_unicode().to_string(),
            false => c.to_string(),
        })
        .collect::<String>()
        .into()
}

fn dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// Left-aligned columns separated by two spaces, trailing blanks trimmed.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let header = header.map(String::from);
    let mut out = String::new();
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{:<w$}", safe(c)))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The `ps` table: NAME ID STATE IP MAC TAP PORTS FORKED_FROM AGE.
pub fn instances_table(list: &[Instance], now: DateTime<Utc>) -> String {
    let rows: Vec<[String; 9]> = list
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.id.clone(),
                i.state.as_str().to_string(),
                dash(&i.network.ip).to_string(),
                dash(&i.network.mac).to_string(),
                dash(&i.network.tap).to_string(),
                ports(i),
                dash(&i.forked_from).to_string(),
                age(i.created_at, now),
            ]
        })
        .collect();
    table(
        [
            "NAME",
            "ID",
            "STATE",
            "IP",
            "MAC",
            "TAP",
            "PORTS",
            "FORKED_FROM",
            "AGE",
        ],
        &rows,
    )
}

/// Published ports as `8080:80/tcp,5353:53/udp`, or `-`.
fn ports(i: &Instance) -> String {
    if i.ports.is_empty() {
        return "-".into();
    }
    let list: Vec<String> = i.ports.iter().map(ToString::to_string).collect();
    list.join(",")
}

fn ms(v: Option<&f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

/// How the fork got its network identity: the path, or "pending" while a
/// `--no-wait` handoff is still running, or "failed".
fn handoff_path(i: &Instance) -> String {
    match &i.handoff {
        None => "-".into(),
        Some(h) => match (h.path, &h.error) {
            (Some(p), None) => p.as_str().into(),
            (Some(p), Some(_)) => format!("{}(failed)", p.as_str()),
            (None, Some(_)) => "failed".into(),
            (None, None) => "pending".into(),
        },
    }
}

/// The fork table: NAME ID STATE IP MAC PATH NETWORK_READY_MS TOTAL_MS. A
/// failed fork shows as state "FAILED" (its error is printed separately).
pub fn forks_table(list: &[ForkOutcome]) -> String {
    let rows: Vec<[String; 8]> = list
        .iter()
        .map(|o| match o {
            ForkOutcome::Created(i) => {
                let stages = i.handoff.as_ref().map(|h| &h.stages_ms);
                [
                    i.name.clone(),
                    i.id.clone(),
                    i.state.as_str().to_string(),
                    dash(&i.network.ip).to_string(),
                    dash(&i.network.mac).to_string(),
                    handoff_path(i),
                    ms(stages.and_then(|s| s.get("network_ready"))),
                    ms(stages.and_then(|s| s.get("total"))),
                ]
            }
            ForkOutcome::Failed(f) => [
                f.name.clone(),
                "-".into(),
                "FAILED".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        })
        .collect();
    table(
        [
            "NAME",
            "ID",
            "STATE",
            "IP",
            "MAC",
            "PATH",
            "NETWORK_READY_MS",
            "TOTAL_MS",
        ],
        &rows,
    )
}

/// Bytes as "512B", "4.0KiB", "92.5MiB", "1.2GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

/// The `snapshot ls` table: NAME ID SOURCE IP VCPUS MEMORY SIZE STANDBY_OF AGE.
pub fn snapshots_table(list: &[Snapshot], now: DateTime<Utc>) -> String {
    let rows: Vec<[String; 9]> = list
        .iter()
        .map(|s| {
            [
                dash(&s.name).to_string(),
                s.id.clone(),
                s.source_instance_name.clone(),
                dash(&s.network.ip).to_string(),
                s.vcpus.to_string(),
                format!("{}MiB", s.memory_mb),
                bytes(s.size_bytes),
                dash(&s.standby_of).to_string(),
                age(s.created_at, now),
            ]
        })
        .collect();
    table(
        [
            "NAME",
            "ID",
            "SOURCE",
            "IP",
            "VCPUS",
            "MEMORY",
            "SIZE",
            "STANDBY_OF",
            "AGE",
        ],
        &rows,
    )
}

/// The `image ls` table: NAME STATUS DIGEST SIZE AGE.
pub fn images_table(list: &[Image], now: DateTime<Utc>) -> String {
    let rows: Vec<[String; 5]> = list
        .iter()
        .map(|i| {
            let status = match (&i.error_code, i.queue_position) {
                (Some(code), _) => format!("{:?} ({code})", i.status).to_lowercase(),
                (None, Some(q)) => format!("pending (#{})", q + 1),
                _ => format!("{:?}", i.status).to_lowercase(),
            };
            let digest = i.digest.strip_prefix("sha256:").unwrap_or("-");
            [
                i.name.clone(),
                status,
                digest.chars().take(12).collect(),
                i.size_bytes.map(bytes).unwrap_or_else(|| "-".into()),
                age(i.created_at, now),
            ]
        })
        .collect();
    table(["NAME", "STATUS", "DIGEST", "SIZE", "AGE"], &rows)
}

/// A key/value summary of one instance.
pub fn instance_summary(i: &Instance) -> String {
    let n = &i.network;
    let mut lines = vec![
        ("name", i.name.clone()),
        ("id", i.id.clone()),
        ("state", i.state.as_str().to_string()),
        ("image", i.image.clone()),
        ("vcpus", i.vcpus.to_string()),
        ("memory", format!("{} ({} MiB)", i.size, i.memory_mb)),
    ];
    if let Some(e) = &i.state_error {
        lines.push(("state_error", e.clone()));
    }
    if n.enabled {
        let ip = match (&n.ip, n.prefix_len) {
            (Some(ip), Some(p)) => format!("{ip}/{p}"),
            (ip, _) => dash(ip).to_string(),
        };
        lines.push(("ip", ip));
        lines.push(("gateway", dash(&n.gateway).to_string()));
        lines.push(("mac", dash(&n.mac).to_string()));
        lines.push(("tap", dash(&n.tap).to_string()));
        lines.push(("egress", if n.egress { "on" } else { "off" }.into()));
        lines.push(("ports", ports(i)));
    } else {
        lines.push(("network", "disabled".into()));
    }
    if !i.command.is_empty() {
        lines.push(("command", i.command.join(" ")));
    }
    if let Some(pid) = i.pid {
        lines.push(("pid", pid.to_string()));
    }
    if let Some(a) = &i.accel {
        lines.push(("accel", a.clone()));
    }
    if let Some(f) = &i.forked_from {
        lines.push(("forked_from", f.clone()));
    }
    if let Some(s) = &i.snapshot_id {
        lines.push(("snapshot", s.clone()));
    }
    if let Some(h) = &i.handoff {
        lines.push(("handoff", handoff_path(i)));
        if let Some(r) = &h.fallback_reason {
            lines.push(("fallback", r.clone()));
        }
        if let Some(e) = &h.error {
            lines.push(("handoff_err", e.clone()));
        }
        if !h.stages_ms.is_empty() {
            let stages: Vec<String> = h
                .stages_ms
                .iter()
                .map(|(k, v)| format!("{k}={v:.1}"))
                .collect();
            lines.push(("stages_ms", stages.join(" ")));
        }
    }
    lines.push(("created", i.created_at.to_rfc3339()));
    let mut out = String::new();
    for (k, v) in lines {
        out.push_str(&format!("{k:<12}{}\n", safe(&v)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_cannot_reach_the_terminal_as_control_sequences() {
        assert_eq!(safe("plain\ttext\nnext"), "plain\ttext\nnext");
        assert_eq!(safe("\u{1b}[2Jgone\u{7}"), "\\u{1b}[2Jgone\\u{7}");
        assert_eq!(safe("csi\u{9b}"), "csi\\u{9b}");
        assert_eq!(safe("ünïcode ok"), "ünïcode ok");
    }
    use forkvm_api::wire::{InstanceNetwork, InstanceState};

    fn inst(name: &str, ip: Option<&str>) -> Instance {
        Instance {
            tags: Default::default(),
            id: format!("id-{name}"),
            name: name.into(),
            image: "default".into(),
            state: InstanceState::Running,
            state_error: None,
            created_at: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            started_at: None,
            stopped_at: None,
            env: Default::default(),
            vcpus: 1,
            size: "256MB".into(),
            hypervisor: "qemu".into(),
            has_snapshot: false,
            network: InstanceNetwork {
                enabled: ip.is_some(),
                ip: ip.map(String::from),
                ..Default::default()
            },
            memory_mb: 256,
            command: vec![],
            pid: None,
            accel: None,
            snapshot_id: None,
            forked_from: None,
            handoff: None,
            base: None,
            ports: vec![],
        }
    }

    #[test]
    fn table_aligns_and_fills_gaps() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T02:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = instances_table(
            &[inst("a", Some("10.88.0.2")), inst("longer-name", None)],
            now,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME         ID"));
        assert!(lines[1].contains("10.88.0.2"));
        assert!(lines[2].contains("Running  -"));
        assert!(lines[1].ends_with("-            2h"), "{}", lines[1]);
        // columns line up: ID starts at the same offset everywhere
        let off = lines[0].find("ID").unwrap();
        assert_eq!(&lines[1][off..off + 4], "id-a");
    }

    #[test]
    fn fork_table_shows_path_timings_and_failures() {
        use forkvm_api::wire::{ErrorBody, ForkFailure, Handoff, HandoffPath};
        let mut ok = inst("f-1", Some("10.88.0.7"));
        ok.forked_from = Some("id-src".into());
        ok.handoff = Some(Handoff {
            path: Some(HandoffPath::Mailbox),
            stages_ms: [("network_ready".to_string(), 3.25), ("total".into(), 41.0)].into(),
            ..Default::default()
        });
        let mut pending = inst("f-2", Some("10.88.0.8"));
        pending.handoff = Some(Handoff::default());
        let t = forks_table(&[
            ForkOutcome::Created(Box::new(ok.clone())),
            ForkOutcome::Created(Box::new(pending)),
            ForkOutcome::Failed(ForkFailure {
                name: "f-3".into(),
                error: ErrorBody {
                    code: "exhausted".into(),
                    message: "no address".into(),
                },
            }),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("NAME  ID"));
        assert!(
            lines[0].ends_with("PATH     NETWORK_READY_MS  TOTAL_MS"),
            "{}",
            lines[0]
        );
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "f-1",
                "id-f-1",
                "Running",
                "10.88.0.7",
                "-",
                "mailbox",
                "3.2",
                "41.0"
            ]
        );
        assert!(lines[2].contains("pending"));
        assert!(lines[3].starts_with("f-3") && lines[3].contains("FAILED"));

        let s = instance_summary(&ok);
        assert!(s.contains("forked_from id-src"), "{s}");
        assert!(
            s.contains("stages_ms   network_ready=3.2 total=41.0"),
            "{s}"
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(4096), "4.0KiB");
        assert_eq!(bytes(97_000_000), "92.5MiB");
        assert_eq!(bytes(3 << 30), "3.0GiB");
    }

    #[test]
    fn ages() {
        let t0 = Utc::now();
        assert_eq!(age(t0, t0 + chrono::Duration::seconds(59)), "59s");
        assert_eq!(age(t0, t0 + chrono::Duration::seconds(61)), "1m");
        assert_eq!(age(t0, t0 + chrono::Duration::days(3)), "3d");
        assert_eq!(age(t0 + chrono::Duration::seconds(5), t0), "0s");
    }
}
