//! Which x86 vector extension the CPU backend's own kernels use, chosen at run time: the
//! binary is built for baseline x86-64 (no `target-cpu=native`), and each kernel has an
//! AVX-512, an AVX2+FMA and a portable version. The best one the CPU supports runs, unless the
//! environment variable `CUATTN_CPU_ISA` (`avx512`, `avx2` or `scalar`) asks for a lower one:
//! that is how the AVX2 path is exercised on an AVX-512 machine. A request above what the CPU
//! supports is capped, so no setting can make the process execute an unsupported instruction.
//!
//! (The `gemm` crate, used for the many-row GEMMs, makes the same choice itself at run time:
//! its AVX-512 kernels run only where `avx512f` is detected.)
//!
//! Also here: the size of the per-core L2 cache, which decides how many-row GEMMs are cut
//! (see `cpu::row_piece`).

use std::sync::OnceLock;

/// An instruction-set level, ordered: a CPU that supports one supports those below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, whatever the compiler makes of it for the baseline target.
    Scalar,
    /// AVX2 and FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512 F: 16 f32 lanes.
    Avx512,
}

impl Isa {
    /// The best level this CPU supports.
    pub fn supported() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        })
    }

    /// The level the kernels use: [`Isa::supported`], lowered by `CUATTN_CPU_ISA` when set
    /// (an unknown value is ignored).
    pub fn current() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let asked = match std::env::var("CUATTN_CPU_ISA").as_deref() {
                Ok("avx512") => Isa::Avx512,
                Ok("avx2") => Isa::Avx2,
                Ok("scalar") => Isa::Scalar,
                _ => Isa::Avx512,
            };
            asked.min(Isa::supported())
        })
    }

    /// `self`, or the best supported level below it: what a kernel asked to run at `self`
    /// may actually use.
    pub fn capped(self) -> Isa {
        self.min(Isa::supported())
    }

    /// Every level this CPU can run, lowest first (for tests that cover each path).
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i <= Isa::supported())
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Bytes of level-2 cache per core (cpu0's unified or data L2, from Linux's sysfs), or `None`
/// where the system does not say. Read once.
pub fn l2_cache_bytes() -> Option<usize> {
    static L2: OnceLock<Option<usize>> = OnceLock::new();
    *L2.get_or_init(|| {
        let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
        (0..16).find_map(|i| {
            let index = dir.join(format!("index{i}"));
            let read = |file: &str| std::fs::read_to_string(index.join(file)).ok();
            let level = read("level")?;
            let kind = read("type")?;
            if level.trim() != "2" || kind.trim() == "Instruction" {
                return None;
            }
            parse_cache_size(read("size")?.trim())
        })
    })
}

/// A cache size as sysfs writes it: "1024K", "2M", or bytes.
fn parse_cache_size(s: &str) -> Option<usize> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 10),
        b'M' => (&s[..s.len() - 1], 20),
        b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<usize>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("1024K"), Some(1 << 20));
        assert_eq!(parse_cache_size("2M"), Some(2 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        for bad in ["", "K", "x1K", "-1K", "99999999999999999999G"] {
            assert_eq!(parse_cache_size(bad), None, "{bad:?}");
        }
    }
}
