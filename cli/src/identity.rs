//! `mesh identity ...`: create CAs, issue SVIDs, inspect certificates and
//! print trust bundles.

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use mesh_core::identity::{
    CertificateAuthority, Credentials, ExpectedIdentity, RootCa, SpiffeId, TrustDomain,
    cert::{self, CertInfo, human_duration},
    csr, files,
    svid::leaf_spiffe_id,
    verify::{PeerRole, verify_peer},
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

#[derive(Debug, Subcommand)]
pub(crate) enum IdentityCmd {
    /// Certificate authority commands.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Issue a leaf X.509-SVID (fresh key, CSR, signed by the CA).
    Issue(IssueArgs),
    /// Show a certificate's SPIFFE ID, validity, and whether its chain verifies.
    Inspect(InspectArgs),
    /// Print a CA's trust bundle.
    Bundle(BundleArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum CaCmd {
    /// Create a root and an issuer for a trust domain.
    Create(CaCreateArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CaCreateArgs {
    /// Trust domain of the new CA, e.g. west.mesh.local.
    #[arg(long)]
    trust_domain: TrustDomain,
    /// Directory to write root.crt, root.key, issuer.crt, issuer.key, bundle.json.
    #[arg(long)]
    out: PathBuf,
    /// Sign the issuer with the root in this CA directory (needs its
    /// root.crt and root.key) instead of creating a new root. The root key
    /// is not copied.
    #[arg(long, value_name = "DIR")]
    shared_root: Option<PathBuf>,
    /// Lifetime of the issuer.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    issuer_ttl: Duration,
    /// Lifetime of a new root.
    #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
    root_ttl: Duration,
    /// Replace CA files that already exist in --out.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct IssueArgs {
    /// CA directory (from `mesh identity ca create`).
    #[arg(long)]
    ca: PathBuf,
    /// Identity to issue, e.g. spiffe://west.mesh.local/ns/shop/sa/web.
    #[arg(long)]
    spiffe_id: SpiffeId,
    /// Lifetime of the SVID (clamped to the issuer's expiry).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Directory to write leaf.crt (leaf then issuer) and leaf.key.
    #[arg(long)]
    out: PathBuf,
    /// Replace leaf.crt and leaf.key if they exist.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// PEM certificate file (a chain: leaf first).
    file: PathBuf,
    /// Trust bundle (SPIFFE JSON or PEM) to verify the chain against.
    #[arg(long)]
    bundle: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct BundleArgs {
    /// CA directory (from `mesh identity ca create`).
    #[arg(long)]
    ca: PathBuf,
    #[arg(long, value_enum, default_value_t = BundleFormat::Spiffe)]
    format: BundleFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum BundleFormat {
    /// SPIFFE bundle format (JWK Set with `use: x509-svid`).
    Spiffe,
    /// PEM certificates.
    Pem,
}

pub(crate) fn run(cmd: IdentityCmd, out: &mut impl Write) -> Result<ExitCode> {
    match cmd {
        IdentityCmd::Ca(CaCmd::Create(args)) => ca_create(args, out),
        IdentityCmd::Issue(args) => issue(args, out),
        IdentityCmd::Inspect(args) => inspect(args, out),
        IdentityCmd::Bundle(args) => bundle(args, out),
    }
}

fn ca_create(args: CaCreateArgs, out: &mut impl Write) -> Result<ExitCode> {
    let existing = files::existing_ca_files(&args.out);
    if !existing.is_empty() && !args.force {
        bail!(
            "{} already exists; pass --force to replace the CA (every SVID it issued will stop verifying)",
            existing[0].display()
        );
    }
    let now = cert::now();
    let (root, shared) = match &args.shared_root {
        Some(dir) => (files::load_root(dir)?, true),
        None => (RootCa::generate(args.root_ttl, now)?, false),
    };
    let ca =
        CertificateAuthority::generate(args.trust_domain.clone(), &root, args.issuer_ttl, now)?;
    let written = files::write_ca_dir(&args.out, &root, &ca, !shared)?;
    writeln!(out, "created CA for trust domain {}", args.trust_domain)?;
    match &args.shared_root {
        Some(dir) => writeln!(
            out,
            "  root:   shared, from {} (key not copied)",
            dir.display()
        )?,
        None => writeln!(
            out,
            "  root:   new, valid until {}",
            rfc3339(root.info().not_after)
        )?,
    }
    writeln!(
        out,
        "  issuer: valid until {}",
        rfc3339(ca.issuer_info().not_after)
    )?;
    for path in written {
        writeln!(out, "  wrote {}", path.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn issue(args: IssueArgs, out: &mut impl Write) -> Result<ExitCode> {
    let crt = args.out.join("leaf.crt");
    let key = args.out.join("leaf.key");
    for path in [&crt, &key] {
        if path.exists() && !args.force {
            bail!(
                "{} already exists; pass --force to replace it",
                path.display()
            );
        }
    }
    let ca = files::load_ca(&args.ca)?;
    let (key_der, csr_der) = csr::new_key_and_csr()?;
    let svid = ca
        .sign_csr(&csr_der, &args.spiffe_id, args.ttl)
        .with_context(|| format!("CA {} cannot issue {}", args.ca.display(), args.spiffe_id))?;
    // Prove the pair works before writing it.
    Credentials::new(svid.chain.clone(), key_der.clone_key())?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    files::write_public(&crt, cert::certs_to_pem(&svid.chain).as_bytes())?;
    files::write_private(&key, cert::key_to_pem(&key_der).as_bytes())?;
    writeln!(out, "issued {}", args.spiffe_id)?;
    writeln!(out, "  serial:    {}", svid.serial)?;
    writeln!(out, "  not after: {}", rfc3339(svid.not_after))?;
    writeln!(out, "  wrote {}", crt.display())?;
    writeln!(out, "  wrote {}", key.display())?;
    Ok(ExitCode::SUCCESS)
}

fn inspect(args: InspectArgs, out: &mut impl Write) -> Result<ExitCode> {
    let chain = cert::certs_from_pem(&files::read(&args.file)?)
        .with_context(|| format!("{}", args.file.display()))?;
    let info = CertInfo::parse(&chain[0]).with_context(|| format!("{}", args.file.display()))?;
    let now = cert::now();
    let id = leaf_spiffe_id(&info);

    writeln!(out, "file:         {}", args.file.display())?;
    match (&id, info.is_ca) {
        (Ok(id), _) => {
            writeln!(out, "spiffe id:    {id}")?;
            writeln!(out, "trust domain: {}", id.trust_domain())?;
        }
        (Err(_), true) => {
            writeln!(out, "spiffe id:    none (a CA certificate)")?;
            if let [uri] = info.uri_sans.as_slice() {
                writeln!(out, "trust domain: {}", uri.trim_start_matches("spiffe://"))?;
            }
        }
        (Err(e), false) => writeln!(out, "spiffe id:    none: {e}")?,
    }
    writeln!(out, "subject:      {}", info.subject)?;
    writeln!(out, "issuer:       {}", info.issuer)?;
    writeln!(out, "serial:       {}", info.serial)?;
    writeln!(out, "not before:   {}", rfc3339(info.not_before))?;
    writeln!(out, "not after:    {}", rfc3339(info.not_after))?;
    match info.remaining(now) {
        Ok(left) => writeln!(out, "remaining:    {}", human_duration(left))?,
        Err(ago) => writeln!(
            out,
            "remaining:    none, EXPIRED {} ago",
            human_duration(ago)
        )?,
    }
    writeln!(out, "chain:        {} certificate(s)", chain.len())?;

    let Some(bundle_path) = args.bundle else {
        writeln!(out, "verifies:     not checked (pass --bundle)")?;
        return Ok(ExitCode::SUCCESS);
    };
    let id = match id {
        Ok(id) => id,
        Err(e) => {
            writeln!(out, "verifies:     no: not an X.509-SVID: {e}")?;
            return Ok(ExitCode::FAILURE);
        }
    };
    let bundle = files::load_bundle(&bundle_path, id.trust_domain())?;
    let bundles = [bundle].into_iter().collect();
    let expected = ExpectedIdentity::trust_domain(id.trust_domain());
    let unix_now = cert::unix_time(now);
    let verdict = [PeerRole::Server, PeerRole::Client]
        .into_iter()
        .try_for_each(|role| verify_peer(&chain, &bundles, &expected, role, unix_now).map(|_| ()));
    match verdict {
        Ok(()) => {
            writeln!(out, "verifies:     yes, against {}", bundle_path.display())?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            writeln!(out, "verifies:     no: {e}")?;
            Ok(ExitCode::FAILURE)
        }
    }
}

fn bundle(args: BundleArgs, out: &mut impl Write) -> Result<ExitCode> {
    let issuer_path = args.ca.join(files::ISSUER_CERT);
    let issuer = cert::certs_from_pem(&files::read(&issuer_path)?)
        .with_context(|| format!("{}", issuer_path.display()))?;
    let info = CertInfo::parse(&issuer[0]).with_context(|| format!("{}", issuer_path.display()))?;
    let td = match info.uri_sans.as_slice() {
        [uri] => TrustDomain::parse(uri)
            .with_context(|| format!("{}: URI SAN {uri:?}", issuer_path.display()))?,
        _ => bail!(
            "{} names no trust domain; was it made by `mesh identity ca create`?",
            issuer_path.display()
        ),
    };
    let bundle = files::load_bundle(&args.ca.join(files::BUNDLE), td)?;
    match args.format {
        BundleFormat::Spiffe => write!(out, "{}", bundle.to_spiffe_json()?)?,
        BundleFormat::Pem => write!(out, "{}", bundle.to_pem())?,
    }
    Ok(ExitCode::SUCCESS)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}
