//! The .deb: what it holds, and a unit that `systemd-analyze verify`
//! accepts with a low exposure score.

use std::{path::Path, process::Command};

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} could not run ({e}); .ci/run installs it"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_ships_the_binary_and_a_hardened_unit_systemd_accepts() {
    let bin = env!("CARGO_BIN_EXE_mesh-vm-agent");
    let out = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("package/build-deb.sh");
    let deb = run(Command::new(&script).arg(bin).arg(out.path()));
    let deb = deb.trim();
    assert!(deb.ends_with(".deb"), "{deb}");

    let info = run(Command::new("dpkg-deb").arg("--info").arg(deb));
    assert!(info.contains("Package: mesh-vm-agent"), "{info}");
    assert!(info.contains("Depends: libc6 (>= 2.36), systemd"), "{info}");
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(deb));
    for path in [
        "./usr/bin/mesh-vm-agent",
        "./lib/systemd/system/mesh-vm-agent.service",
    ] {
        assert!(contents.contains(path), "{path} in\n{contents}");
    }
    assert!(
        contents.lines().next().unwrap().starts_with("drwxr-xr-x"),
        "the package must not change / to another mode:\n{contents}"
    );

    let root = out.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/mesh-vm-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/mesh-vm-agent run --config /etc/mesh/vm-agent.json"));
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE",
        "StateDirectory=mesh",
        "RuntimeDirectory=mesh",
    ] {
        assert!(unit.contains(line), "{line} in\n{unit}");
    }

    // systemd checks that ExecStart exists on this machine, so verify the
    // same unit pointing at the binary under test.
    let here = out.path().join("mesh-vm-agent.service");
    std::fs::write(&here, unit.replace("/usr/bin/mesh-vm-agent", bin)).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .expect("systemd-analyze runs (.ci/run installs systemd)");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");

    let security = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&here));
    let score: f64 = security
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for mesh-vm-agent.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in\n{security}"));
    assert!(
        score <= 3.0,
        "exposure {score} (systemd's scale: 0 best, 10 worst)"
    );
}
