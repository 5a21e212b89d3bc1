//! Compiles `proto/quiver.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/quiver.proto");
    let descriptors = protox::compile(["proto/quiver.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".quiver.v1.LaunchTask.plan")
        // Held in job statuses, which are cloned on every update.
        .bytes(".quiver.v1.MapOutput.inline_result")
        .compile_fds(descriptors)?;
    Ok(())
}
