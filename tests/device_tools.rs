//! The GPU machine's scripts (`tools/device/`) run only where a GPU is lent, so their syntax and
//! the profile summarizer's parsing are checked here, on every machine: a broken script would
//! otherwise cost a device call to find.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (needed by this test): {e}"))
}

#[test]
fn device_scripts_parse() {
    let dir = root().join("tools/device");
    let mut scripts: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    scripts.sort();
    assert!(
        scripts.iter().any(|p| p.ends_with("check.sh")),
        "check.sh missing from {}",
        dir.display()
    );
    for script in scripts {
        let out = run("bash", &["-n", script.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for py in ["kernel_table.py", "torch_baseline.py"] {
        let path = dir.join(py);
        let code = "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])";
        let out = run("python3", &["-c", code, path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{py}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn kernel_table_reads_ncu_and_torch_profiles() {
    let out = run("python3", &["tools/device/kernel_table.py", "--self-test"]);
    assert!(
        out.status.success(),
        "kernel_table.py --self-test: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("self-test ok"));
}
