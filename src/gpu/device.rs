//! Getting a device (for `util`) and the benchmark's auxiliary pipelines: part of `gpu`, the
//! only module that builds wgpu descriptors.

use crate::error::{Error, Result};

/// A device on the adapter that wgpu's environment variables pick, with the adapter's own
/// limits and `TIMESTAMP_QUERY` where it has it (see `util::request_device`).
pub(crate) async fn request_device() -> Result<(wgpu::Adapter, wgpu::Device, wgpu::Queue)> {
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

/// A compute pipeline with its own bind group layout (from the shader), for the benchmark's
/// ceiling kernels: built here so that they go through the same code as the step's.
pub fn auxiliary_pipeline(
    device: &wgpu::Device,
    label: &str,
    wgsl: &str,
    entry_point: &str,
    constants: &[(&str, f64)],
) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(wgsl.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some(entry_point),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants,
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    })
}
