//! Backend selection by device name.

use burn::tensor::Device;

/// Device names accepted in `train.device`.
pub const DEVICE_NAMES: &str = "\"cpu\" (libtorch), \"cuda:N\" (libtorch on GPU N) or \"flex\" (pure Rust)";

/// Checks the form of a device name without asking whether that device
/// exists, so configs for other machines can be inspected anywhere.
pub fn check_device_name(name: &str) -> Result<(), String> {
    let valid = match name {
        "cpu" => cfg!(feature = "tch"),
        "flex" => cfg!(feature = "flex"),
        _ => name.strip_prefix("cuda:").is_some_and(|index| index.parse::<usize>().is_ok()),
    };
    if valid { Ok(()) } else { Err(format!("unknown device {name:?}; use {DEVICE_NAMES}")) }
}

/// Returns the device named `name`, or an error naming the accepted values.
pub fn parse_device(name: &str) -> Result<Device, String> {
    match name {
        #[cfg(feature = "tch")]
        #[allow(deprecated)] // burn-tch is the libtorch path this project builds on.
        "cpu" => Ok(Device::libtorch()),
        #[cfg(feature = "flex")]
        "flex" => Ok(Device::flex()),
        _ => {
            if let Some(index) = name.strip_prefix("cuda:") {
                return cuda_device(name, index);
            }
            Err(format!("unknown device {name:?}; use {DEVICE_NAMES}"))
        }
    }
}

#[cfg(feature = "tch")]
fn cuda_device(name: &str, index: &str) -> Result<Device, String> {
    let index: usize = index.parse().map_err(|_| format!("invalid device {name:?}; write the GPU index as in \"cuda:0\""))?;
    let available = tch::Cuda::device_count() as usize;
    if available == 0 {
        return Err(format!(
            "device {name:?} is not available: libtorch sees no CUDA device (no GPU here, or a libtorch build without CUDA); use the \"cpu\" device"
        ));
    }
    if index >= available {
        return Err(format!(
            "device {name:?} is not available: libtorch sees {available} CUDA devices; use an index from 0 to {}",
            available - 1
        ));
    }
    #[allow(deprecated)]
    Ok(Device::libtorch_cuda(index))
}

#[cfg(not(feature = "tch"))]
fn cuda_device(name: &str, _index: &str) -> Result<Device, String> {
    Err(format!("device {name:?} needs the `tch` feature; rebuild with it or use train.device = \"flex\""))
}
