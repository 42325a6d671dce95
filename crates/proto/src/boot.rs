//! Boot configuration passed from host to guest.
//!
//! forkvm passes it as a QEMU fw_cfg file, [`FW_CFG_NAME`], holding the JSON
//! document ([`BootConfig::to_fw_cfg`]): the instance's env can hold secrets,
//! and the kernel command line is readable by every host user in
//! `/proc/<qemu>/cmdline` and by every guest user in `/proc/cmdline`, while
//! the guest's fw_cfg files are root's (0400) and the host's copy is a 0600
//! file removed once QEMU has read it. The agent reads the fw_cfg file and
//! falls back to the command line (other hosts, the agent's own VM tests).
//!
//! Command-line encoding: `forkvm.cfg=<base64url, no padding, of the JSON document>`. base64url
//! keeps the value free of spaces and quotes, which the kernel's command-line
//! parser would otherwise split or strip. The dotted key also means the kernel
//! treats it as a (unknown) module parameter and does not hand it to init as an
//! environment variable or argument; the agent reads `/proc/cmdline` instead.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// Default virtio-serial port name the agent serves its RPC on.
pub const AGENT_PORT_NAME: &str = "forkvm.agent";

/// Command-line key carrying the encoded [`BootConfig`].
pub const CMDLINE_KEY: &str = "forkvm.cfg";

/// Upper bound for the whole `forkvm.cfg=...` token. x86's kernel command line is
/// limited to 2048 bytes; this leaves room for console and other parameters.
pub const MAX_CMDLINE_ARG_LEN: usize = 1500;

/// fw_cfg file name carrying the [`BootConfig`] JSON (`opt/` names are the
/// ones QEMU leaves to users).
pub const FW_CFG_NAME: &str = "opt/forkvm/boot";

/// Where the guest kernel (`qemu_fw_cfg` module) shows it.
pub const FW_CFG_GUEST_PATH: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/forkvm/boot/raw";

/// Upper bound of the fw_cfg document (env and entrypoint included).
pub const MAX_FW_CFG_LEN: usize = 64 * 1024;

/// Errors encoding or decoding a [`BootConfig`].
#[derive(Debug, thiserror::Error)]
pub enum BootConfigError {
    #[error("kernel command line has no `{CMDLINE_KEY}=` token")]
    Missing,
    #[error("`{CMDLINE_KEY}` is not valid base64url: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("`{CMDLINE_KEY}` is not a valid boot config document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("encoded boot config is {len} bytes, limit is {max}")]
    TooLong { len: usize, max: usize },
}

/// Network identity to apply to one guest interface at boot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(default)]
pub struct BootNetwork {
    /// Guest interface name, e.g. `eth0`.
    pub interface: String,
    /// `aa:bb:cc:dd:ee:ff`; empty = keep the device's MAC.
    pub mac: String,
    /// Dotted IPv4 address.
    pub ipv4: String,
    pub prefix_len: u8,
    /// Default gateway; empty = no default route.
    pub gateway: String,
    /// DNS servers written to `/etc/resolv.conf`.
    pub dns: Vec<String>,
}

/// Everything the guest agent needs to know at boot.
///
/// `Default` sets `agent_port` to [`AGENT_PORT_NAME`]; missing JSON fields take
/// the same defaults, so older hosts can omit new fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default)]
pub struct BootConfig {
    pub hostname: String,
    /// `None` = leave the network interface down.
    pub network: Option<BootNetwork>,
    /// Environment for the entrypoint and for Exec (request env overrides it).
    pub env: BTreeMap<String, String>,
    /// Optional user program started after network setup (empty = none).
    pub entrypoint: Vec<String>,
    /// virtio-serial port name the agent serves on.
    pub agent_port: String,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            hostname: String::new(),
            network: None,
            env: BTreeMap::new(),
            entrypoint: Vec::new(),
            agent_port: AGENT_PORT_NAME.to_owned(),
        }
    }
}

impl BootConfig {
    /// Encodes the config as one kernel command-line token, `forkvm.cfg=<base64url>`.
    pub fn to_cmdline_arg(&self) -> Result<String, BootConfigError> {
        let json = serde_json::to_vec(self)?;
        let arg = format!("{CMDLINE_KEY}={}", URL_SAFE_NO_PAD.encode(json));
        if arg.len() > MAX_CMDLINE_ARG_LEN {
            return Err(BootConfigError::TooLong {
                len: arg.len(),
                max: MAX_CMDLINE_ARG_LEN,
            });
        }
        Ok(arg)
    }

    /// The fw_cfg document: JSON, at most [`MAX_FW_CFG_LEN`] bytes.
    pub fn to_fw_cfg(&self) -> Result<Vec<u8>, BootConfigError> {
        let json = serde_json::to_vec(self)?;
        if json.len() > MAX_FW_CFG_LEN {
            return Err(BootConfigError::TooLong {
                len: json.len(),
                max: MAX_FW_CFG_LEN,
            });
        }
        Ok(json)
    }

    /// Decodes a fw_cfg document (bounded like [`Self::to_fw_cfg`]).
    pub fn from_fw_cfg(bytes: &[u8]) -> Result<BootConfig, BootConfigError> {
        if bytes.len() > MAX_FW_CFG_LEN {
            return Err(BootConfigError::TooLong {
                len: bytes.len(),
                max: MAX_FW_CFG_LEN,
            });
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Finds the `forkvm.cfg=` token in a whole kernel command line and decodes it.
    /// If the token appears more than once the last one wins, as with kernel parameters.
    pub fn from_cmdline(cmdline: &str) -> Result<BootConfig, BootConfigError> {
        let prefix = format!("{CMDLINE_KEY}=");
        let value = cmdline
            .split_ascii_whitespace()
            .filter_map(|tok| tok.strip_prefix(prefix.as_str()))
            .next_back()
            .ok_or(BootConfigError::Missing)?;
        if value.len() + prefix.len() > MAX_CMDLINE_ARG_LEN {
            return Err(BootConfigError::TooLong {
                len: value.len() + prefix.len(),
                max: MAX_CMDLINE_ARG_LEN,
            });
        }
        let json = URL_SAFE_NO_PAD.decode(value)?;
        Ok(serde_json::from_slice(&json)?)
    }

    /// The port name to serve on: `agent_port`, or [`AGENT_PORT_NAME`] when empty.
    pub fn effective_agent_port(&self) -> &str {
        if self.agent_port.is_empty() {
            AGENT_PORT_NAME
        } else {
            &self.agent_port
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fw_cfg_round_trips_and_is_bounded() {
        let mut c = sample();
        c.env.insert("SECRET".into(), "x y=z\n\"'".into());
        let bytes = c.to_fw_cfg().unwrap();
        assert_eq!(BootConfig::from_fw_cfg(&bytes).unwrap(), c);
        c.env.insert("BIG".into(), "a".repeat(MAX_FW_CFG_LEN));
        assert!(matches!(
            c.to_fw_cfg(),
            Err(BootConfigError::TooLong { .. })
        ));
        let big = vec![b' '; MAX_FW_CFG_LEN + 1];
        assert!(matches!(
            BootConfig::from_fw_cfg(&big),
            Err(BootConfigError::TooLong { .. })
        ));
        assert!(BootConfig::from_fw_cfg(b"{not json").is_err());
    }

    fn sample() -> BootConfig {
        BootConfig {
            hostname: "vm-1".into(),
            network: Some(BootNetwork {
                interface: "eth0".into(),
                mac: "02:fc:00:00:00:01".into(),
                ipv4: "10.0.0.2".into(),
                prefix_len: 24,
                gateway: "10.0.0.1".into(),
                dns: vec!["10.0.0.1".into(), "1.1.1.1".into()],
            }),
            env: [("A".to_string(), "b c".to_string())].into(),
            entrypoint: vec!["/bin/sh".into(), "-c".into(), "echo 'hi there'".into()],
            agent_port: AGENT_PORT_NAME.into(),
        }
    }

    #[test]
    fn round_trip_inside_a_full_cmdline() {
        let cfg = sample();
        let arg = cfg.to_cmdline_arg().unwrap();
        assert!(arg.starts_with("forkvm.cfg="));
        // No characters the kernel's parser would split on or strip.
        assert!(!arg.contains([' ', '"', '\'', '\n', '=']) || arg.matches('=').count() == 1);
        let cmdline = format!("console=ttyS0 quiet {arg} panic=-1\n");
        assert_eq!(BootConfig::from_cmdline(&cmdline).unwrap(), cfg);
    }

    #[test]
    fn default_and_missing_fields() {
        assert_eq!(BootConfig::default().agent_port, AGENT_PORT_NAME);
        let arg = format!(
            "forkvm.cfg={}",
            URL_SAFE_NO_PAD.encode(br#"{"hostname":"h"}"#)
        );
        let cfg = BootConfig::from_cmdline(&arg).unwrap();
        assert_eq!(cfg.hostname, "h");
        assert_eq!(cfg.agent_port, AGENT_PORT_NAME);
        assert!(cfg.network.is_none());
        let empty_port = BootConfig {
            agent_port: String::new(),
            ..BootConfig::default()
        };
        assert_eq!(empty_port.effective_agent_port(), AGENT_PORT_NAME);
    }

    #[test]
    fn last_token_wins() {
        let a = BootConfig {
            hostname: "a".into(),
            ..Default::default()
        };
        let b = BootConfig {
            hostname: "b".into(),
            ..Default::default()
        };
        let line = format!(
            "{} {}",
            a.to_cmdline_arg().unwrap(),
            b.to_cmdline_arg().unwrap()
        );
        assert_eq!(BootConfig::from_cmdline(&line).unwrap().hostname, "b");
    }

    #[test]
    fn missing_token() {
        let err =
            BootConfig::from_cmdline("console=ttyS0 forkvm.cfgx=abc forkvm.other=1").unwrap_err();
        assert!(matches!(err, BootConfigError::Missing), "{err:?}");
    }

    #[test]
    fn bad_base64() {
        let err = BootConfig::from_cmdline("forkvm.cfg=not*base64!").unwrap_err();
        assert!(matches!(err, BootConfigError::Base64(_)), "{err:?}");
    }

    #[test]
    fn bad_json() {
        let arg = format!("forkvm.cfg={}", URL_SAFE_NO_PAD.encode(b"{\"hostname\": 5"));
        let err = BootConfig::from_cmdline(&arg).unwrap_err();
        assert!(matches!(err, BootConfigError::Json(_)), "{err:?}");
        let arg = format!(
            "forkvm.cfg={}",
            URL_SAFE_NO_PAD.encode(br#"{"hostname": 5}"#)
        );
        let err = BootConfig::from_cmdline(&arg).unwrap_err();
        assert!(matches!(err, BootConfigError::Json(_)), "{err:?}");
    }

    #[test]
    fn too_long() {
        let cfg = BootConfig {
            env: [("BIG".to_string(), "x".repeat(1200))].into(),
            ..Default::default()
        };
        let err = cfg.to_cmdline_arg().unwrap_err();
        assert!(
            matches!(err, BootConfigError::TooLong { len, max: MAX_CMDLINE_ARG_LEN } if len > MAX_CMDLINE_ARG_LEN),
            "{err:?}"
        );
        // The decoder enforces the same bound.
        let long = format!("forkvm.cfg={}", "A".repeat(MAX_CMDLINE_ARG_LEN));
        assert!(matches!(
            BootConfig::from_cmdline(&long).unwrap_err(),
            BootConfigError::TooLong { .. }
        ));
    }
}
