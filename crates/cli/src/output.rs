//! Tables for people, JSON for programs.

use std::io::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Rows aligned in columns, in the style of other container tools.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn add_row<const N: usize>(&mut self, row: [String; N]) {
        self.rows.push(row.to_vec());
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut tw = tabwriter::TabWriter::new(Vec::new()).padding(3);
        for row in &self.rows {
            // Tabs inside cells would break the columns.
            let cells: Vec<String> = row.iter().map(|c| c.replace('\t', " ")).collect();
            writeln!(tw, "{}", cells.join("\t")).map_err(|_| std::fmt::Error)?;
        }
        let bytes = tw.into_inner().map_err(|_| std::fmt::Error)?;
        f.write_str(String::from_utf8_lossy(&bytes).trim_end())
    }
}

pub fn table<const N: usize>(header: [&str; N]) -> Table {
    Table {
        rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
    }
}

/// Prints `value` as pretty JSON.
pub fn json<T: serde::Serialize>(value: &T) -> Result<(), Box<dyn std::error::Error>> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `12.3 MiB`.
pub fn size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
