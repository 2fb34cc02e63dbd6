//! The report: tables printed as they are measured, then written with the machine, date
//! and commit into BENCHMARKS.md, between markers so the prose around them stays.

use std::fmt::Write as _;
use std::path::Path;

const BEGIN: &str = "<!-- results: written by `scripts/bench`; do not edit by hand -->";
const END: &str = "<!-- end of results -->";

pub struct Table {
    pub title: String,
    /// One paragraph saying what was measured and how.
    pub about: String,
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, about: &str, header: &[&'static str]) -> Table {
        Table { title: title.to_owned(), about: about.to_owned(), header: header.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        println!("  {}", cells.join(" | "));
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n{}\n\n", self.title, self.about);
        let _ = writeln!(out, "| {} |", self.header.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(self.header.len()));
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new(program).args(args).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Machine, date and commit, as a short list.
pub fn context() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, v)| v.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let commit = command_output("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let rclone = command_output("rclone", &["version"])
        .and_then(|v| v.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "not installed".into());
    format!(
        "- machine: {cpu}, {cores} cores, {mem_gib:.1} GiB memory, Linux {}\n\
         - date: {date}\n\
         - commit: {commit}{}\n\
         - baseline: {rclone}\n",
        kernel.trim(),
        if dirty { " (with uncommitted changes)" } else { "" },
    )
}

/// Replace the results block of the report at `path` (creating the file if needed).
pub fn write(path: &Path, context: &str, tables: &[Table], notes: &[String]) -> std::io::Result<()> {
    let mut block = format!("{BEGIN}\n\n{context}\n");
    for table in tables {
        block.push_str(&table.markdown());
        block.push('\n');
    }
    for note in notes {
        let _ = writeln!(block, "- {note}");
    }
    block.push_str(END);
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(start), Some(end)) if start < end => format!("{}{block}{}", &old[..start], &old[end + END.len()..]),
        _ if old.is_empty() => format!("# Benchmarks\n\n{block}\n"),
        _ => format!("{}\n\n{block}\n", old.trim_end()),
    };
    std::fs::write(path, new)
}
