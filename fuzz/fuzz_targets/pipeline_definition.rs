//! Any text as a pipeline file (TOML) and as an API body (JSON): parsed and checked, or
//! refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_pipelines::PipelineSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = PipelineSpec::from_toml(text) {
        let _ = spec.to_stored();
    }
    if let Ok(spec) = serde_json::from_str::<PipelineSpec>(text) {
        if spec.check().is_ok() {
            let (fields, secrets) = spec.to_stored();
            let _ = PipelineSpec::from_stored(&fields, &secrets);
        }
    }
});
