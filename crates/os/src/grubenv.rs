//! GRUB's environment block (`grubenv`): the only state GRUB can both read and write.
//!
//! The block is exactly 1024 bytes: the line `# GRUB Environment Block`, then one
//! `name=value` line per variable, then `#` padding to the end. GRUB's `save_env`
//! overwrites the file's existing sectors in place, so the size never changes.
//! In a value, GRUB escapes a backslash and a newline with a backslash; this module
//! does the same.
//!
//! Written here rather than taken from a crate: the format is a few lines, and the
//! parser must reject hostile input line by line, which is easiest to prove on our own
//! code (see the tests and the fuzz-friendly [`Env::parse`]).
//!
//! ```
//! use juice_os::grubenv::Env;
//! let mut env = Env::default();
//! env.set("juice_order", "s2 s1").unwrap();
//! let block = env.to_block().unwrap();
//! assert_eq!(Env::parse(&block).unwrap().get("juice_order"), Some("s2 s1"));
//! ```

use std::collections::BTreeMap;

/// The size of every environment block, in bytes.
pub const BLOCK_SIZE: usize = 1024;
/// The first line of every environment block.
pub const SIGNATURE: &[u8] = b"# GRUB Environment Block\n";

/// Why a block or a variable was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrubenvError {
    /// The block is not 1024 bytes long.
    #[error("a GRUB environment block is {BLOCK_SIZE} bytes, this one is {0}")]
    WrongSize(usize),
    /// The block does not start with the signature line.
    #[error("not a GRUB environment block: the first line is not \"# GRUB Environment Block\"")]
    NoSignature,
    /// A line of the block is not `name=value` (line numbers count the signature as 1).
    #[error("GRUB environment block, line {line}: {reason}")]
    BadLine { line: usize, reason: &'static str },
    /// A variable name has a character GRUB scripts cannot use.
    #[error(
        "GRUB environment variable name {0:?}: only letters, digits and '_' (not first) are allowed"
    )]
    BadName(String),
    /// A value has a NUL byte, which GRUB cannot store.
    #[error("GRUB environment variable {0}: the value has a NUL byte")]
    BadValue(String),
    /// The variables do not fit in 1024 bytes.
    #[error("the GRUB environment needs {needed} bytes, more than the {BLOCK_SIZE} of its block")]
    TooLarge { needed: usize },
}

/// The variables of one environment block, sorted by name (so writing is deterministic).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

/// Whether GRUB scripts can name this variable (`$name`): letters, digits and `_`, not
/// starting with a digit.
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Env {
    /// Parses a 1024-byte block, refusing anything GRUB would not have written.
    pub fn parse(block: &[u8]) -> Result<Env, GrubenvError> {
        if block.len() != BLOCK_SIZE {
            return Err(GrubenvError::WrongSize(block.len()));
        }
        let body = block
            .strip_prefix(SIGNATURE)
            .ok_or(GrubenvError::NoSignature)?;
        let mut vars = BTreeMap::new();
        let mut pos = 0;
        let mut line = 1;
        while pos < body.len() {
            line += 1;
            let bad = |reason| GrubenvError::BadLine { line, reason };
            if body[pos] == b'#' {
                // The padding: it must run to the end of the block.
                if body[pos..].iter().all(|&b| b == b'#') {
                    break;
                }
                return Err(bad("padding '#' must run to the end of the block"));
            }
            let eq = body[pos..]
                .iter()
                .position(|&b| b == b'=' || b == b'\n')
                .map(|i| pos + i)
                .ok_or(bad("no '=' before the end of the block"))?;
            if body[eq] != b'=' {
                return Err(bad("no '=' in the line"));
            }
            let name =
                std::str::from_utf8(&body[pos..eq]).map_err(|_| bad("the name is not UTF-8"))?;
            if !valid_name(name) {
                return Err(bad("the name is not letters, digits and '_'"));
            }
            let mut value = Vec::new();
            let mut i = eq + 1;
            loop {
                match body.get(i) {
                    None => return Err(bad("the value does not end with a newline")),
                    Some(b'\n') => break,
                    Some(b'\\') => {
                        let escaped = *body.get(i + 1).ok_or(bad("a backslash ends the block"))?;
                        if escaped == 0 {
                            return Err(bad("the value has a NUL byte"));
                        }
                        value.push(escaped);
                        i += 2;
                    }
                    Some(0) => return Err(bad("the value has a NUL byte")),
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
            let value = String::from_utf8(value).map_err(|_| bad("the value is not UTF-8"))?;
            if vars.insert(name.to_string(), value).is_some() {
                return Err(bad("the variable is set twice"));
            }
            pos = i + 1;
        }
        Ok(Env { vars })
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Sets `name` to `value`. Whether the block still fits is checked by [`Env::to_block`].
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), GrubenvError> {
        if !valid_name(name) {
            return Err(GrubenvError::BadName(name.to_string()));
        }
        if value.contains('\0') {
            return Err(GrubenvError::BadValue(name.to_string()));
        }
        self.vars.insert(name.to_string(), value.to_string());
        Ok(())
    }

    /// Unsets `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.vars.remove(name)
    }

    /// All variables, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Encodes the variables as a 1024-byte block, as `grub-editenv` would.
    pub fn to_block(&self) -> Result<[u8; BLOCK_SIZE], GrubenvError> {
        let mut out = SIGNATURE.to_vec();
        for (name, value) in &self.vars {
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            for b in value.bytes() {
                if b == b'\\' || b == b'\n' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'\n');
        }
        if out.len() > BLOCK_SIZE {
            return Err(GrubenvError::TooLarge { needed: out.len() });
        }
        let mut block = [b'#'; BLOCK_SIZE];
        block[..out.len()].copy_from_slice(&out);
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn block(body: &[u8]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(body);
        b.resize(BLOCK_SIZE, b'#');
        b
    }

    #[test]
    fn a_block_written_by_grub_editenv_parses() {
        // The layout grub-editenv writes: sorted or not, escapes, '#' padding.
        let env = Env::parse(&block(b"juice_order=s2 s1\ns1_good=1\nodd=a\\\\b\\\nc\n")).unwrap();
        assert_eq!(env.get("juice_order"), Some("s2 s1"));
        assert_eq!(env.get("s1_good"), Some("1"));
        assert_eq!(env.get("odd"), Some("a\\b\nc"));
        assert_eq!(env.get("s2_good"), None);
    }

    #[test]
    fn an_empty_block_parses_and_is_the_same_as_grubs() {
        let env = Env::parse(&block(b"")).unwrap();
        assert_eq!(env, Env::default());
        assert_eq!(env.to_block().unwrap().to_vec(), block(b""));
    }

    #[test]
    fn hostile_blocks_are_refused_and_the_line_named() {
        let cases: &[(&[u8], GrubenvError)] = &[
            (b"", GrubenvError::WrongSize(0)),
            (&[b'#'; 2048], GrubenvError::WrongSize(2048)),
            (&[b'#'; BLOCK_SIZE], GrubenvError::NoSignature),
        ];
        for (input, want) in cases {
            assert_eq!(Env::parse(input).unwrap_err(), *want);
        }
        let lines: &[(&[u8], usize, &str)] = &[
            (b"novalue\n", 2, "no '=' in the line"),
            (b"a=1\n=1\n", 3, "the name is not letters, digits and '_'"),
            (b"a=1\n1a=1\n", 3, "the name is not letters, digits and '_'"),
            (b"a b=1\n", 2, "the name is not letters, digits and '_'"),
            (b"a=1\na=2\n", 3, "the variable is set twice"),
            (b"a=x\0y\n", 2, "the value has a NUL byte"),
            // Found by the fuzz target: an escaped NUL is still a NUL.
            (b"a=\\\0\n", 2, "the value has a NUL byte"),
            (b"a=\xff\n", 2, "the value is not UTF-8"),
            (
                b"a=1\n##b=2\n",
                3,
                "padding '#' must run to the end of the block",
            ),
        ];
        for (body, line, reason) in lines {
            assert_eq!(
                Env::parse(&block(body)).unwrap_err(),
                GrubenvError::BadLine {
                    line: *line,
                    reason
                },
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // A value that runs into the end of the block has no newline.
        let mut long = SIGNATURE.to_vec();
        long.extend_from_slice(b"a=");
        long.resize(BLOCK_SIZE, b'x');
        assert_eq!(
            Env::parse(&long).unwrap_err(),
            GrubenvError::BadLine {
                line: 2,
                reason: "the value does not end with a newline"
            }
        );
        long[BLOCK_SIZE - 1] = b'\\';
        assert_eq!(
            Env::parse(&long).unwrap_err(),
            GrubenvError::BadLine {
                line: 2,
                reason: "a backslash ends the block"
            }
        );
    }

    #[test]
    fn names_grub_cannot_use_and_blocks_that_overflow_are_refused() {
        let mut env = Env::default();
        assert_eq!(
            env.set("a-b", "1"),
            Err(GrubenvError::BadName("a-b".into()))
        );
        assert_eq!(env.set("", "1"), Err(GrubenvError::BadName(String::new())));
        assert_eq!(env.set("a", "x\0"), Err(GrubenvError::BadValue("a".into())));
        env.set("big", &"x".repeat(BLOCK_SIZE)).unwrap();
        assert!(matches!(env.to_block(), Err(GrubenvError::TooLarge { .. })));
        assert_eq!(env.remove("big").map(|v| v.len()), Some(BLOCK_SIZE));
        // Exactly full: no padding at all still parses.
        let room = BLOCK_SIZE - SIGNATURE.len() - "a=\n".len();
        env.set("a", &"y".repeat(room)).unwrap();
        let full = env.to_block().unwrap();
        assert_eq!(Env::parse(&full).unwrap(), env);
    }

    proptest! {
        #[test]
        fn any_env_that_fits_round_trips(
            vars in proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,12}", "[^\0]{0,40}", 0..12)
        ) {
            let mut env = Env::default();
            for (k, v) in &vars {
                env.set(k, v).unwrap();
            }
            match env.to_block() {
                Ok(block) => prop_assert_eq!(Env::parse(&block).unwrap(), env),
                Err(GrubenvError::TooLarge { needed }) => prop_assert!(needed > BLOCK_SIZE),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn any_bytes_parse_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), BLOCK_SIZE - SIGNATURE.len())) {
            let mut b = SIGNATURE.to_vec();
            b.extend_from_slice(&bytes);
            if let Ok(env) = Env::parse(&b) {
                // Whatever parses re-encodes to a block that parses to the same variables.
                prop_assert_eq!(Env::parse(&env.to_block().unwrap()).unwrap(), env);
            }
        }
    }
}
