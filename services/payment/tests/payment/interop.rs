//! A client generated in another language: `interop/python/journey.py` compiles the protos
//! with stock grpcio-tools and walks a fan's journey against the four real services, reading
//! a refusal's ErrorInfo with stock grpcio-status.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::mesh;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Python with the pinned requirements: `INTEROP_PYTHON` when set, otherwise a virtualenv
/// under target/ made on first use (from PyPI) and remade when the requirements change.
fn python() -> PathBuf {
    if let Ok(python) = std::env::var("INTEROP_PYTHON") {
        return python.into();
    }
    let root = workspace();
    let requirements = root.join("interop/python/requirements.txt");
    let venv = root.join("target/interop-venv");
    let python = venv.join("bin/python");
    let installed = venv.join("installed-requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements.txt");
    if python.exists() && std::fs::read_to_string(&installed).ok().as_ref() == Some(&wanted) {
        return python;
    }
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv));
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements));
    std::fs::write(&installed, wanted).expect("stamp the virtualenv");
    python
}

#[tokio::test]
async fn a_python_client_generated_from_the_protos_walks_the_journey() {
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let mesh = mesh(50, |_| {}).await;
    let address = |url: String| url.trim_start_matches("http://").to_owned();
    let args = vec![
        workspace()
            .join("interop/python/journey.py")
            .display()
            .to_string(),
        "--queue".into(),
        address(mesh.queue_handle.url()),
        "--concert".into(),
        address(mesh.concert_handle.as_ref().unwrap().url()),
        "--point".into(),
        address(mesh.point_handle.as_ref().unwrap().url()),
        "--payment".into(),
        address(mesh.payments[0].handle.as_ref().unwrap().url()),
        "--concert-id".into(),
        mesh.concert_id.clone(),
    ];
    let output = tokio::task::spawn_blocking(move || Command::new(python).args(args).output())
        .await
        .unwrap()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("python interop:"), "{stdout}");
    assert_eq!(mesh.payment_rows().await.len(), 1);
    mesh.audit().await;
}
