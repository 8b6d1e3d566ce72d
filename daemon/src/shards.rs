//! Serving shards: with several serving devices one daemon runs one engine per device behind one
//! API. This module holds what they share: each device's name, and the rendezvous hashing
//! (highest-random-weight hashing, Thaler & Ravishankar 1998) that gives every adapter a *home*
//! device — where the registry places it when it is loaded.

/// 64-bit FNV-1a: a hash that stays the same across builds and platforms (std's hasher makes no
/// such promise), so an adapter keeps its home device across restarts.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Rendezvous (highest-random-weight) order of `n` devices for `name`: device indices by
/// descending weight `hash(name, index)`. The first is the name's home; removing a device moves
/// only the names whose home it was.
pub fn rendezvous(name: &str, n: usize) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = (0..n)
        .map(|i| {
            (
                fnv1a(&[name.as_bytes(), b"\0", &(i as u64).to_le_bytes()]),
                i,
            )
        })
        .collect();
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    order.into_iter().map(|(_, i)| i).collect()
}

/// The home device of `name` among `n`: where the registry places it on load.
pub fn home(name: &str, n: usize) -> usize {
    rendezvous(name, n).first().copied().unwrap_or(0)
}

/// Shard names for `--device`'s list: the device names, with `#index` added to every entry of a
/// name given more than once (`cpu,cpu` → `cpu#0`, `cpu#1`) so that each names one shard.
pub fn names<T: std::fmt::Display>(devices: &[T]) -> Vec<String> {
    let plain: Vec<String> = devices.iter().map(ToString::to_string).collect();
    plain
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if plain.iter().filter(|m| *m == n).count() > 1 {
                format!("{n}#{i}")
            } else {
                n.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_spreads_names() {
        assert_eq!(rendezvous("a", 4), rendezvous("a", 4));
        let mut order = rendezvous("a", 4);
        order.sort_unstable();
        assert_eq!(order, [0, 1, 2, 3]);
        // Many names: every one of two devices is some name's home.
        let homes: Vec<usize> = (0..32).map(|i| home(&format!("ad-{i}"), 2)).collect();
        assert!(homes.contains(&0) && homes.contains(&1), "{homes:?}");
        // Removing the last device moves only the names that lived there.
        for i in 0..32 {
            let name = format!("ad-{i}");
            let (h3, h2) = (home(&name, 3), home(&name, 2));
            if h3 != 2 {
                assert_eq!(h3, h2, "{name}");
            }
        }
        assert_eq!(home("x", 1), 0);
    }

    #[test]
    fn repeated_device_names_get_indices() {
        assert_eq!(names(&["cuda:0", "cuda:1"]), ["cuda:0", "cuda:1"]);
        assert_eq!(names(&["cpu", "cpu"]), ["cpu#0", "cpu#1"]);
        assert_eq!(names(&["cpu"]), ["cpu"]);
    }
}
