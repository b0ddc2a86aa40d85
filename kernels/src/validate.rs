//! Checks of the compile inputs a caller controls, before they reach NVRTC.

use crate::KernelError;

/// Checks a GPU architecture string: `sm_NN`, `sm_NNa`, `sm_NNf` or `compute_NN...`, the forms
/// NVRTC's `--gpu-architecture` takes (anything else would reach NVRTC's option parser).
pub fn validate_arch(arch: &str) -> Result<(), KernelError> {
    let digits = arch.strip_prefix("sm_").or_else(|| arch.strip_prefix("compute_"));
    let ok = digits.is_some_and(|d| {
        let d = d.strip_suffix('a').or_else(|| d.strip_suffix('f')).unwrap_or(d);
        (2..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit())
    });
    if ok {
        Ok(())
    } else {
        Err(KernelError::InvalidArch { arch: arch.to_string() })
    }
}

/// Checks a `-D` macro: a C identifier as name, and a value without NUL or line breaks (which
/// could not be passed, or would inject source lines).
pub fn validate_define(name: &str, value: &str) -> Result<(), KernelError> {
    let invalid = |reason| Err(KernelError::InvalidDefine { name: name.to_string(), reason });
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return invalid("a macro name starts with a letter or '_'"),
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return invalid("a macro name has only letters, digits and '_'");
    }
    if value.contains(['\0', '\n', '\r']) {
        return invalid("the value contains a NUL or line break");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_strings() {
        for ok in ["sm_80", "sm_90", "sm_90a", "sm_100", "sm_100f", "compute_90"] {
            assert!(validate_arch(ok).is_ok(), "{ok}");
        }
        for bad in ["", "sm_", "sm90", "sm_9", "sm_90 ", "sm_90;", "--sm_90", "sm_1000", "gfx90a"] {
            assert!(matches!(validate_arch(bad), Err(KernelError::InvalidArch { .. })), "{bad:?}");
        }
    }

    #[test]
    fn define_names_and_values() {
        assert!(validate_define("ARB_HEAD_DIM", "128").is_ok());
        assert!(validate_define("_X1", "a b").is_ok());
        for bad in ["", "1X", "A-B", "A B", "A=B"] {
            assert!(validate_define(bad, "1").is_err(), "{bad:?}");
        }
        assert!(validate_define("A", "1\n#include <x>").is_err());
        assert!(validate_define("A", "1\0").is_err());
    }
}
