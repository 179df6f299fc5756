//! What `gluster volume status VOLUME detail` says about a volume's size,
//! and what `gluster volume heal VOLUME info summary` says about its bricks
//! and pending heals. Pure: the engine and the brick probe
//! ([`crate::gluster_probe`]) run the commands and hand the text here.

/// The volume's capacity in bytes from the status detail: bricks in the
/// order listed form replica sets of `replica`; a set holds as much as its
/// smallest online brick, and the volume the sum of its sets. `None` when a
/// set has no online brick with a size (the capacity is then unknown).
pub fn volume_capacity(detail: &str, replica: u32) -> Option<u64> {
    let bricks = bricks(detail);
    if bricks.is_empty() {
        return None;
    }
    let mut total = 0u64;
    for set in bricks.chunks(replica.max(1) as usize) {
        let smallest = set.iter().filter_map(|b| *b).min()?;
        total = total.saturating_add(smallest);
    }
    Some(total)
}

/// Each brick's total size if it is online and says it, in order.
fn bricks(detail: &str) -> Vec<Option<u64>> {
    let mut bricks: Vec<(bool, Option<u64>)> = Vec::new();
    for line in detail.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "Brick" => bricks.push((false, None)),
            "Online" => {
                if let Some(b) = bricks.last_mut() {
                    b.0 = value == "Y";
                }
            }
            "Total Disk Space" => {
                if let Some(b) = bricks.last_mut() {
                    b.1 = human_bytes(value);
                }
            }
            _ => {}
        }
    }
    bricks
        .into_iter()
        .map(|(online, size)| size.filter(|_| online))
        .collect()
}

/// One brick of a heal info summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealBrick {
    /// `host:/path`.
    pub name: String,
    /// The heal info's client reached it (`Status: Connected`): its
    /// process runs and serves.
    pub connected: bool,
    /// Entries pending heal on it (`Total Number of entries`); `None` where
    /// the summary could not count them (`-`).
    pub entries: Option<u64>,
}

/// Each brick of a heal info summary, in order. (The summary comes from
/// `glfsheal`, a client of the bricks: unlike `gluster volume status`, it
/// takes no glusterd lock, so brick nodes may run it while the operator
/// node changes the volume.)
pub fn heal_summary(summary: &str) -> Vec<HealBrick> {
    let mut bricks: Vec<HealBrick> = Vec::new();
    for line in summary.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("Brick ") {
            bricks.push(HealBrick {
                name: name.trim().to_owned(),
                connected: false,
                entries: None,
            });
        } else if let Some(value) = line.strip_prefix("Total Number of entries:") {
            if let Some(b) = bricks.last_mut() {
                b.entries = value.trim().parse().ok();
            }
        } else if let Some(status) = line.strip_prefix("Status:") {
            if let Some(b) = bricks.last_mut() {
                b.connected = status.trim() == "Connected";
            }
        }
    }
    bricks
}

/// `39.1GB` (gluster's 1024-based units, one decimal) in bytes.
fn human_bytes(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "" | "Bytes" | "B" => 1u64,
        "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        "PB" => 1 << 50,
        _ => return None,
    };
    let bytes = number * scale as f64;
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As glusterfs 10.3 prints it (one brick offline).
    const DETAIL: &str = "\
Status of volume: data
------------------------------------------------------------------------------
Brick                : Brick 198.18.0.199:/data/glusterfs/data/brick1/brick
TCP Port             : 57421
RDMA Port            : 0
Online               : Y
Pid                  : 311
File System          : ext4
Device               : /dev/vda1
Mount Options        : rw,relatime
Inode Size           : 256
Disk Space Free      : 20.3GB
Total Disk Space     : 39.1GB
Inode Count          : 2621440
Free Inodes          : 2339102
------------------------------------------------------------------------------
Brick                : Brick 198.18.0.198:/data/glusterfs/data/brick1/brick
TCP Port             : 53330
RDMA Port            : 0
Online               : Y
Pid                  : 299
Total Disk Space     : 38.5GB
------------------------------------------------------------------------------
Brick                : Brick 198.18.0.197:/data/glusterfs/data/brick1/brick
TCP Port             : N/A
RDMA Port            : N/A
Online               : N
Pid                  : N/A
Total Disk Space     : 1.0TB
";

    #[test]
    fn a_replica_set_holds_what_its_smallest_online_brick_holds() {
        let want = (38.5 * (1u64 << 30) as f64) as u64;
        assert_eq!(volume_capacity(DETAIL, 3), Some(want));
        // Two sets of one brick... and an offline one: unknown.
        assert_eq!(volume_capacity(DETAIL, 1), None);
        let two_sets = DETAIL.replace("Online               : N", "Online               : Y");
        let tb = 1u64 << 40;
        let gb = |g: f64| (g * (1u64 << 30) as f64) as u64;
        assert_eq!(volume_capacity(&two_sets, 2), Some(gb(38.5) + tb));
    }

    /// `gluster volume heal data info summary` after files were written
    /// while a brick was down: the connected bricks as glusterfs 10.3
    /// printed them in `tests/tests/gluster_heal.rs`, an unreachable brick
    /// as `glfsh_print_hr_heal_op_summary` (glfs-heal.c) prints one.
    const HEAL_SUMMARY: &str = "\
Brick 198.18.0.2:/data/glusterfs/data/brick1/brick
Status: Connected
Total Number of entries: 2
Number of entries in heal pending: 2
Number of entries in split-brain: 0
Number of entries possibly healing: 0

Brick 198.18.0.3:/data/glusterfs/data/brick1/brick
Status: Connected
Total Number of entries: 2
Number of entries in heal pending: 2
Number of entries in split-brain: 0
Number of entries possibly healing: 0

Brick 198.18.0.4:/data/glusterfs/data/brick1/brick
Status: Transport endpoint is not connected
Total Number of entries: -
Number of entries in heal pending: -
Number of entries in split-brain: -
Number of entries possibly healing: -

";

    #[test]
    fn the_heal_summary_counts_pending_entries_per_reachable_brick() {
        let brick = |host: &str, connected, entries| HealBrick {
            name: format!("{host}:/data/glusterfs/data/brick1/brick"),
            connected,
            entries,
        };
        assert_eq!(
            heal_summary(HEAL_SUMMARY),
            [
                brick("198.18.0.2", true, Some(2)),
                brick("198.18.0.3", true, Some(2)),
                brick("198.18.0.4", false, None),
            ]
        );
        let healed = HEAL_SUMMARY
            .replace("entries: 2", "entries: 0")
            .replace("Transport endpoint is not connected", "Connected")
            .replace("entries: -", "entries: 0");
        assert!(heal_summary(&healed)
            .iter()
            .all(|b| b.connected && b.entries == Some(0)));
        assert!(heal_summary("Volume data does not exist").is_empty());
    }

    #[test]
    fn no_bricks_or_no_sizes_is_unknown() {
        assert_eq!(volume_capacity("Volume data does not exist", 3), None);
        assert_eq!(volume_capacity("Brick : x\nOnline : Y\n", 1), None);
        assert_eq!(human_bytes("512.0KB"), Some(512 * 1024));
        assert_eq!(human_bytes("lots"), None);
    }
}
