//! A minimal blocking QMP client: `stop` and `cont` around a mailbox patch.

use std::path::Path;
use std::time::{Duration, Instant};

/// Minimal blocking QMP client (one JSON object per line).
pub struct Qmp {
    rd: std::io::BufReader<std::os::unix::net::UnixStream>,
    wr: std::os::unix::net::UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        use std::io::BufRead;
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP connect: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut q = Qmp {
            rd: std::io::BufReader::new(s.try_clone().unwrap()),
            wr: s,
        };
        let mut greeting = String::new();
        q.rd.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "{greeting}");
        q.cmd("qmp_capabilities");
        q
    }

    pub fn cmd(&mut self, execute: &str) -> serde_json::Value {
        use std::io::{BufRead, Write};
        let req = serde_json::json!({ "execute": execute });
        writeln!(self.wr, "{req}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.rd.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "QMP {execute}: {v}");
        }
    }
}
