//! Human-readable tables and JSON output.

use chrono::{DateTime, Utc};
use forkvm_api::wire::Instance;
use serde::Serialize;

/// Pretty JSON on stdout.
pub fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
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

fn dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// The `ps` table: NAME ID STATE IP MAC TAP AGE.
pub fn instances_table(list: &[Instance], now: DateTime<Utc>) -> String {
    let header = ["NAME", "ID", "STATE", "IP", "MAC", "TAP", "AGE"].map(String::from);
    let rows: Vec<[String; 7]> = list
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.id.clone(),
                i.state.as_str().to_string(),
                dash(&i.network.ip).to_string(),
                dash(&i.network.mac).to_string(),
                dash(&i.network.tap).to_string(),
                age(i.created_at, now),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
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
    lines.push(("created", i.created_at.to_rfc3339()));
    let mut out = String::new();
    for (k, v) in lines {
        out.push_str(&format!("{k:<12}{v}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkvm_api::wire::{InstanceNetwork, InstanceState};

    fn inst(name: &str, ip: Option<&str>) -> Instance {
        Instance {
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
        assert!(lines[1].ends_with("2h"));
        // columns line up: ID starts at the same offset everywhere
        let off = lines[0].find("ID").unwrap();
        assert_eq!(&lines[1][off..off + 4], "id-a");
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
