//! What the node is (facts) and how it is doing (health), from `sysinfo`,
//! and disk space from our own reading of the mount table.
//! Sampling is kept cheap: one `System` reused, only memory, disks and the
//! load average refreshed per heartbeat.
//!
//! Disks are not sysinfo's: its listing stats every mount point, and a
//! `stat` or `statfs` on a hung FUSE mount (a Gluster volume whose client
//! froze) never returns, which stopped the session loop and had systemd's
//! watchdog abort the agent over and over (`tests/gluster_mounts.rs`).
//! [`local_disks`] reads `/proc/self/mountinfo` and asks only local file
//! systems.

use std::time::{Duration, Instant};

use steward_proto::domain::{Disk, Facts, Health, NetworkInterface};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, Networks, System};

/// Disk usage changes slowly; sample it at most this often.
const DISK_REFRESH: Duration = Duration::from_secs(10);

pub struct HostProbe {
    system: Option<System>,
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
            boot_id: crate::reboot::boot_id(),
            ..Default::default()
        };
        if let Some(system) = &mut self.system {
            system.refresh_cpu_list(CpuRefreshKind::nothing());
            system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
            facts.cpus = system.cpus().len() as u32;
            facts.memory_bytes = system.total_memory();
        }
        facts.disks = local_disks()
            .into_iter()
            .map(|d| Disk {
                mount_point: d.mount_point,
                total_bytes: d.total_bytes,
                available_bytes: d.available_bytes,
            })
            .collect();
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
            self.max_disk_used = local_disks()
                .iter()
                .filter(|d| d.total_bytes > 0 && !d.read_only)
                .map(|d| 1.0 - d.available_bytes as f64 / d.total_bytes as f64)
                .fold(0.0, f64::max);
        }
        health.max_disk_used_fraction = self.max_disk_used;
        health
    }
}

/// A mounted local file system and its space.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDisk {
    pub mount_point: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub read_only: bool,
}

/// A mount from `/proc/self/mountinfo`: mount point, type, read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    point: String,
    fstype: String,
    read_only: bool,
}

/// Local file systems with space, each mount point once, with their space
/// (`statvfs`): no pseudo file system, and nothing whose answer comes over
/// the network or from a user-space daemon (FUSE, NFS, CIFS, ...), which
/// may never come.
pub fn local_disks() -> Vec<LocalDisk> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut seen = std::collections::BTreeSet::new();
    mounts(&text)
        .into_iter()
        .filter(|m| has_local_space(m) && seen.insert(m.point.clone()))
        .filter_map(|m| {
            let st = nix::sys::statvfs::statvfs(m.point.as_str()).ok()?;
            let block = st.fragment_size() as u64;
            Some(LocalDisk {
                total_bytes: (st.blocks() as u64).saturating_mul(block),
                available_bytes: (st.blocks_available() as u64).saturating_mul(block),
                read_only: m.read_only,
                mount_point: m.point,
            })
        })
        .collect()
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let point = unescape(fields.get(4)?);
            let options = fields.get(5)?;
            let fstype = right.split(' ').next()?.to_owned();
            Some(Mount {
                point,
                fstype,
                read_only: options.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// `\040` and friends in mountinfo paths.
fn unescape(path: &str) -> String {
    path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Whether `m` is a local file system with disk space to report.
fn has_local_space(m: &Mount) -> bool {
    let t = m.fstype.as_str();
    let pseudo = matches!(
        t,
        "rootfs"
            | "sysfs"
            | "proc"
            | "devtmpfs"
            | "tmpfs"
            | "cgroup"
            | "cgroup2"
            | "pstore"
            | "squashfs"
            | "rpc_pipefs"
            | "iso9660"
            | "devpts"
            | "hugetlbfs"
            | "mqueue"
            | "debugfs"
            | "tracefs"
            | "securityfs"
            | "configfs"
            | "bpf"
            | "binfmt_misc"
            | "fusectl"
            | "nsfs"
            | "ramfs"
    );
    let remote = t == "fuse"
        || t.starts_with("fuse.")
        || t == "fuseblk"
        || matches!(
            t,
            "nfs"
                | "nfs4"
                | "cifs"
                | "smb3"
                | "smbfs"
                | "ceph"
                | "glusterfs"
                | "9p"
                | "afs"
                | "autofs"
                | "lustre"
                | "gfs2"
                | "ocfs2"
        );
    let skipped_place = m.point.starts_with("/sys")
        || m.point.starts_with("/proc")
        || (m.point.starts_with("/run") && !m.point.starts_with("/run/media"));
    !(pseudo || remote || skipped_place)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/a
23 22 0:5 / /proc rw,nosuid - proc proc rw
24 22 8:1 / /data rw,relatime - ext4 /dev/sda1 rw
25 22 8:2 / /boot ro,relatime - ext4 /dev/sda2 ro
26 22 0:50 / /mnt/steward/gluster/data rw,relatime - fuse.glusterfs 198.18.0.10:/data rw
27 22 0:51 / /mnt/nfs rw - nfs4 server:/x rw
28 22 0:52 / /tmp rw - tmpfs tmpfs rw
29 22 8:3 / /srv/with\\040space rw - xfs /dev/sda3 rw
";

    #[test]
    fn only_local_file_systems_are_asked_for_space() {
        let local: Vec<(String, bool)> = mounts(MOUNTINFO)
            .into_iter()
            .filter(has_local_space)
            .map(|m| (m.point, m.read_only))
            .collect();
        assert_eq!(
            local,
            [
                ("/".to_owned(), false),
                ("/data".to_owned(), false),
                ("/boot".to_owned(), true),
                ("/srv/with space".to_owned(), false),
            ]
        );
    }

    #[test]
    fn this_hosts_disks_are_read() {
        let disks = local_disks();
        assert!(disks.iter().any(|d| d.mount_point == "/"), "{disks:?}");
    }
}
