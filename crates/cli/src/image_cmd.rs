//! `forkvm image build`: builds the default guest image with forkvm-image.

use anyhow::{Context, bail};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct ImageBuildArgs {
    /// Path of the static guest agent binary to put into the initramfs
    /// (default: $FORKVM_AGENT, else `forkvm-agent` beside this binary).
    #[arg(long, env = "FORKVM_AGENT")]
    pub agent: Option<PathBuf>,
    /// State directory the image goes into (images/default/).
    #[arg(long, env = "FORKVM_DATA_DIR", default_value = "/var/lib/forkvm")]
    pub data_dir: PathBuf,
    /// Rebuild even if an image with the same inputs exists.
    #[arg(long)]
    pub force: bool,
}

fn default_agent() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let sibling = exe.parent()?.join("forkvm-agent");
    sibling.exists().then_some(sibling)
}

pub fn image_build(args: ImageBuildArgs) -> anyhow::Result<()> {
    let Some(agent) = args.agent.or_else(default_agent) else {
        bail!(
            "no guest agent binary: pass --agent PATH (build it with `RUSTFLAGS=\"-C target-feature=+crt-static\" \
             cargo build --release -p forkvm-agent --target x86_64-unknown-linux-gnu`)"
        );
    };
    if !agent.is_file() {
        bail!("guest agent binary {} does not exist", agent.display());
    }
    let inputs = forkvm_image::ImageInputs::new(&args.data_dir, &agent);
    if args.force {
        let manifest = args
            .data_dir
            .join("images")
            .join(forkvm_image::DEFAULT_IMAGE)
            .join("manifest.json");
        match std::fs::remove_file(&manifest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", manifest.display())),
        }
    }
    let t0 = Instant::now();
    let progress = forkvm_image::BarProgress::new();
    let image = forkvm_image::build_default_image(&inputs, &progress)
        .context("building the default guest image")?;
    println!(
        "image {}: kernel {} ({} {}), {} modules, initrd {} — {:.1} s",
        image.name,
        image.kernel_version,
        image.kernel_package,
        image.kernel_package_version,
        image.modules.len(),
        image.initrd.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
