//! The few QMP commands Juice sends: the handshake, `query-status` and `quit`.
//! QMP is newline-delimited JSON on a unix socket; serde_json does the work.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let stream =
            UnixStream::connect(path).map_err(|e| format!("QMP {}: {e}", path.display()))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| format!("QMP: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP: {e}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP: unexpected greeting {greeting}"));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        if self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP: {e}"))?
            == 0
        {
            return Err("QMP: the VMM closed the connection".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: {e}"))
    }

    /// Runs a command and returns its `return` value (events in between are skipped).
    pub fn execute(&mut self, command: &str) -> Result<Value, String> {
        self.execute_with(command, Value::Null)
    }

    /// Runs a command with arguments.
    pub fn execute_with(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut msg = if arguments.is_null() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        }
        .to_string();
        msg.push('\n');
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {command}: {e}"));
            }
        }
    }

    /// `running`, `paused`, `shutdown`, ...
    pub fn status(&mut self) -> Result<String, String> {
        let r = self.execute("query-status")?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }
}
