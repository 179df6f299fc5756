//! What the node is (facts) and how it is doing (health), from `sysinfo`.
//! Sampling is kept cheap: one `System` reused, only memory, disks and the
//! load average refreshed per heartbeat.

use std::time::{Duration, Instant};

use steward_proto::domain::{Disk, Facts, Health, NetworkInterface};
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, System};

/// Disk usage changes slowly; sample it at most this often.
const DISK_REFRESH: Duration = Duration::from_secs(10);

pub struct HostProbe {
    system: Option<System>,
    disks: Option<Disks>,
    disks_sampled: Option<Instant>,
    max_disk_used: f64,
}

impl Default for HostProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl HostProbe {
    pub fn new() -> Self {
        Self {
            system: System::new().ok(),
            disks: None,
            disks_sampled: None,
            max_disk_used: 0.0,
        }
    }

    /// Everything a coordinator wants to know once per session.
    pub fn facts(&mut self) -> Facts {
        let mut facts = Facts {
            hostname: System::host_name().unwrap_or_default(),
            os: System::long_os_version().unwrap_or_default(),
            kernel: System::kernel_version().unwrap_or_default(),
            ..Default::default()
        };
        if let Some(system) = &mut self.system {
            system.refresh_cpu_list(CpuRefreshKind::nothing());
            system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
            facts.cpus = system.cpus().len() as u32;
            facts.memory_bytes = system.total_memory();
        }
        if let Ok(disks) = Disks::new_with_refreshed_list() {
            facts.disks = disks
                .iter()
                .map(|d| Disk {
                    mount_point: d.mount_point().display().to_string(),
                    total_bytes: d.total_space(),
                    available_bytes: d.available_space(),
                })
                .collect();
        }
        if let Ok(networks) = Networks::new_with_refreshed_list() {
            let mut interfaces: Vec<NetworkInterface> = networks
                .iter()
                .map(|(name, data)| NetworkInterface {
                    name: name.to_string_lossy().into_owned(),
                    mac: data.mac_address().to_string(),
                    addresses: data
                        .ip_networks()
                        .iter()
                        .map(|n| format!("{}/{}", n.addr, n.prefix))
                        .collect(),
                })
                .collect();
            interfaces.sort_by(|a, b| a.name.cmp(&b.name));
            facts.interfaces = interfaces;
        }
        facts
    }

    /// A health sample for a heartbeat.
    pub fn health(&mut self) -> Health {
        let mut health = Health {
            load1: System::load_average().map(|l| l.one).unwrap_or(0.0),
            ..Default::default()
        };
        if let Some(system) = &mut self.system {
            system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
            health.memory_total_bytes = system.total_memory();
            health.memory_used_bytes = system.used_memory();
        }
        if self
            .disks_sampled
            .is_none_or(|t| t.elapsed() >= DISK_REFRESH)
        {
            self.disks_sampled = Some(Instant::now());
            if self.disks.is_none() {
                self.disks = Disks::new_with_refreshed_list().ok();
            }
            if let Some(disks) = &mut self.disks {
                disks.refresh(true);
                self.max_disk_used = disks
                    .iter()
                    .filter(|d| d.total_space() > 0 && !d.is_read_only())
                    .map(|d| 1.0 - d.available_space() as f64 / d.total_space() as f64)
                    .fold(0.0, f64::max);
            }
        }
        health.max_disk_used_fraction = self.max_disk_used;
        health
    }
}
