//! Builds (or reuses) the default image: `build_image <data_dir> <agent_binary>`.
//! Prints the manifest as JSON; shows a progress bar on a terminal.

use forkvm_image::{BarProgress, ImageInputs, build_default_image};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("forkvm_image=info")
        .init();
    let mut args = std::env::args().skip(1);
    let (Some(data_dir), Some(agent)) = (args.next(), args.next()) else {
        return Err("usage: build_image <data_dir> <agent_binary>".into());
    };
    let started = std::time::Instant::now();
    let img = build_default_image(&ImageInputs::new(data_dir, agent), &BarProgress::new())?;
    eprintln!("done in {:?}", started.elapsed());
    println!("{}", serde_json::to_string_pretty(&img)?);
    Ok(())
}
