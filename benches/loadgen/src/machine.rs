//! What machine and which server builds a run measured: CPU count and model,
//! kernel, and the servers' version strings.

use std::path::Path;
use std::process::Command;

#[derive(Clone, Debug)]
pub struct Machine {
    /// CPUs this process may run on (what `nproc` prints).
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn detect() -> Self {
        let nproc = std::thread::available_parallelism().map_or(1, usize::from);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        // x86 names it "model name"; many ARM kernels only give "Hardware" or
        // "CPU part".
        let cpu_model = ["model name", "Hardware", "CPU part"]
            .iter()
            .find_map(|key| {
                cpuinfo.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    (name.trim() == *key).then(|| value.trim().to_string())
                })
            })
            .unwrap_or_else(|| "unknown".to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        Self {
            nproc,
            cpu_model,
            kernel,
        }
    }
}

/// First line of `<program> --version`, or why there is none.
pub fn program_version(program: &Path) -> String {
    match Command::new(program).arg("--version").output() {
        Ok(output) => {
            let text = if output.stdout.is_empty() {
                output.stderr
            } else {
                output.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(error) => format!("unknown ({error})"),
    }
}
