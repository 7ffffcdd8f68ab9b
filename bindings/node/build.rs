//! Build script: napi-build's per-platform linker setup for a Node addon.

fn main() {
    napi_build::setup();
}
