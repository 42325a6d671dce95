//! `forkvm image …`: `build` makes the guest image (kernel + initramfs
//! with the agent) locally; `pull`, `import`, `ls`, `inspect` and `rm`
//! manage OCI images through the daemon.

use crate::client::Client;
use crate::output::{bytes, images_table, print_json};
use anyhow::{Context, bail};
use forkvm_api::wire::{Image, ImageCreateParams, ImageImportParams, ImageStatus, PullCredentials};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;
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

/// `forkvm image pull`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImagePullArgs {
    /// Image reference, e.g. `nginx:1.25` or `127.0.0.1:5000/app:1`.
    pub name: String,
    /// Registry user (the password is read from stdin, one line).
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password from stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Return once the pull is queued instead of waiting until it is ready.
    #[arg(long)]
    pub no_wait: bool,
}

/// `forkvm image import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageImportArgs {
    /// OCI layout (directory, .tar, .tar.gz) or `docker save` archive.
    pub path: PathBuf,
    /// The image's name (default: the name the archive gives it).
    #[arg(long)]
    pub name: Option<String>,
}

/// How long `image pull` waits between looks at the pull's progress.
const POLL: std::time::Duration = std::time::Duration::from_millis(250);

pub async fn pull(c: &Client, json: bool, a: &ImagePullArgs) -> anyhow::Result<ExitCode> {
    let credentials = match &a.username {
        Some(u) => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from stdin")?;
            Some(PullCredentials {
                username: Some(u.clone()),
                password: Some(password.trim_end_matches(['\r', '\n']).to_string()),
                registry_token: None,
            })
        }
        None => None,
    };
    let t0 = Instant::now();
    let p = ImageCreateParams {
        unsupported: Default::default(),
        name: a.name.clone(),
        credentials,
        platform: None,
        tags: None,
    };
    let mut img = c.pull_image(&p).await?;
    let bar = (!json && !a.no_wait).then(|| progress_bar(&img.name));
    while !a.no_wait && !matches!(img.status, ImageStatus::Ready | ImageStatus::Failed) {
        if let Some(bar) = &bar {
            show(bar, &img);
        }
        tokio::time::sleep(POLL).await;
        img = c.get_image(&img.name).await?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    report(json, &img, t0)
}

fn progress_bar(name: &str) -> ProgressBar {
    let bar = ProgressBar::new(0).with_prefix(name.to_string());
    let style = ProgressStyle::with_template("{prefix} {msg} [{bar:30}] {bytes}/{total_bytes}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// The status, and while pulling the bytes of the layers so far.
fn show(bar: &ProgressBar, img: &Image) {
    match (img.status, &img.pull_progress, img.queue_position) {
        (ImageStatus::Pulling, Some(p), _) => {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            bar.set_message(format!(
                "pulling {}/{} layers",
                p.layers_done, p.layers_total
            ));
        }
        (ImageStatus::Pending, _, Some(q)) => bar.set_message(format!("pending (#{})", q + 1)),
        (s, _, _) => bar.set_message(status_word(s)),
    }
}

pub async fn import(c: &Client, json: bool, a: &ImageImportArgs) -> anyhow::Result<ExitCode> {
    let path =
        std::path::absolute(&a.path).with_context(|| format!("resolving {}", a.path.display()))?;
    let t0 = Instant::now();
    let img = c
        .import_image(&ImageImportParams {
            unsupported: Default::default(),
            path: path.to_string_lossy().into_owned(),
            name: a.name.clone(),
            tags: None,
        })
        .await?;
    report(json, &img, t0)
}

fn report(json: bool, img: &Image, t0: Instant) -> anyhow::Result<ExitCode> {
    if json {
        print_json(img)?;
    } else if img.status == ImageStatus::Failed {
        eprintln!(
            "{}: failed ({}): {}",
            img.name,
            img.error_code.as_deref().unwrap_or("error"),
            img.error.as_deref().unwrap_or("no reason given")
        );
    } else {
        println!(
            "{} {} {} {} — {:.1} s",
            img.name,
            status_word(img.status),
            if img.digest.is_empty() {
                "-"
            } else {
                &img.digest
            },
            img.size_bytes.map(bytes).unwrap_or_else(|| "-".into()),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(if img.status == ImageStatus::Failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn ls(c: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let list = c.list_images().await?;
    if json {
        print_json(&list)?;
    } else {
        print!("{}", images_table(&list, chrono::Utc::now()));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn inspect(c: &Client, name: &str) -> anyhow::Result<ExitCode> {
    print_json(&c.get_image(name).await?)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn rm(c: &Client, names: &[String]) -> anyhow::Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for n in names {
        match c.delete_image(n).await {
            Ok(()) => println!("{n}"),
            Err(e) => {
                eprintln!("error: {n}: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

fn status_word(s: ImageStatus) -> &'static str {
    match s {
        ImageStatus::Pending => "pending",
        ImageStatus::Pulling => "pulling",
        ImageStatus::Converting => "converting",
        ImageStatus::Ready => "ready",
        ImageStatus::Failed => "failed",
    }
}
