//! Getting a device, for examples, tests and the benchmark. A training engine brings its own
//! `Device`; this shows what to ask for.

use crate::error::{Error, Result};

/// A device on the adapter that wgpu's environment variables pick (`WGPU_BACKEND`,
/// `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF`), or the default one.
///
/// It requests the adapter's own limits rather than wgpu's defaults: the default
/// `max_buffer_size` (256 MiB) caps a parameter tensor at 64M elements. It enables
/// `TIMESTAMP_QUERY` where the adapter has it (the benchmark uses it).
pub fn request_device_blocking() -> Result<(wgpu::Adapter, wgpu::Device, wgpu::Queue)> {
    pollster::block_on(request_device())
}

/// The async form of [`request_device_blocking`].
pub async fn request_device() -> Result<(wgpu::Adapter, wgpu::Device, wgpu::Queue)> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
        Ok(wanted) => {
            let wanted = wanted.to_lowercase();
            let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
            let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            adapters
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&wanted))
                .ok_or_else(|| {
                    Error::NoAdapter(format!(
                        "WGPU_ADAPTER_NAME={wanted} matches none of {names:?}"
                    ))
                })?
        }
        Err(_) => instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::from_env().unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                Error::NoAdapter(format!(
                    "{e} (without a GPU, install Mesa's software Vulkan driver: \
                     apt-get install mesa-vulkan-drivers libvulkan1)"
                ))
            })?,
    };
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: Some("wgpu-optim"),
            required_features: adapter.features() & wgpu::Features::TIMESTAMP_QUERY,
            required_limits: adapter.limits(),
            ..Default::default()
        })
        .await
        .map_err(|e| Error::NoAdapter(e.to_string()))?;
    Ok((adapter, device, queue))
}
