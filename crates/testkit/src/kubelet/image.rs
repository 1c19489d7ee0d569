//! What an image stands for here: which local binaries run a container of it.

use std::path::{Path, PathBuf};

/// An image the process kubelet can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Image {
    /// The official `postgres:<major>` image (any registry prefix, any tag suffix).
    Postgres { major: u32 },
    /// Any image whose name contains `pgbouncer` (bitnami/pgbouncer, edoburu/pgbouncer, ...).
    PgBouncer,
}

/// The newest major, what `postgres` and `postgres:latest` mean.
pub(crate) const NEWEST_MAJOR: u32 = 18;

/// The majors whose binaries the lab provides.
const MAJORS: std::ops::RangeInclusive<u32> = 10..=NEWEST_MAJOR;

impl Image {
    /// Parses an image reference; `Err` says why it cannot be run.
    pub(crate) fn parse(reference: &str) -> Result<Image, String> {
        let without_digest = reference.split('@').next().unwrap_or(reference);
        let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
        let (name, tag) = last.split_once(':').unwrap_or((last, "latest"));
        if name == "postgres" {
            let digits: String = tag.chars().take_while(char::is_ascii_digit).collect();
            let major = match (tag, digits.parse::<u32>()) {
                ("latest", _) => NEWEST_MAJOR,
                (_, Ok(major)) if MAJORS.contains(&major) => major,
                _ => {
                    return Err(format!(
                        "image {reference:?}: the process kubelet runs postgres:{}..{NEWEST_MAJOR} only",
                        MAJORS.start()
                    ))
                }
            };
            return Ok(Image::Postgres { major });
        }
        if without_digest.contains("pgbouncer") {
            return Ok(Image::PgBouncer);
        }
        Err(format!(
            "image {reference:?} is not supported by the pgshift process kubelet: it runs \
             postgres:<{}..{NEWEST_MAJOR}> (local PostgreSQL binaries) and images named *pgbouncer* \
             (Debian's pgbouncer) only",
            MAJORS.start()
        ))
    }
}

/// Finds `program` (a bare name or a path, of which only the file name counts) among the tools
/// of PostgreSQL `major`; client tools missing there (the server-only majors) come from the
/// newest major that has them — libpq clients work with older servers.
pub(crate) fn postgres_tool(
    binaries: &pgshift_lab::Binaries,
    major: u32,
    program: &str,
) -> Option<PathBuf> {
    let name = Path::new(program).file_name()?;
    std::iter::once(major)
        .chain(MAJORS.rev())
        .filter_map(|m| binaries.bin_dir(m).ok())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// The directories a shell in a `postgres:<major>` container searches: the major's own tools,
/// then the newest full tool set, then the system's.
pub(crate) fn postgres_path(binaries: &pgshift_lab::Binaries, major: u32) -> String {
    let mut dirs: Vec<String> = std::iter::once(major)
        .chain(MAJORS.rev())
        .filter_map(|m| binaries.bin_dir(m).ok())
        .map(|dir| dir.display().to_string())
        .collect();
    dirs.dedup();
    dirs.extend(["/usr/local/bin", "/usr/bin", "/bin"].map(String::from));
    dirs.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_and_pgbouncer_images() {
        assert_eq!(
            Image::parse("postgres:15"),
            Ok(Image::Postgres { major: 15 })
        );
        assert_eq!(
            Image::parse("docker.io/library/postgres:16.4-bookworm"),
            Ok(Image::Postgres { major: 16 })
        );
        assert_eq!(Image::parse("postgres"), Ok(Image::Postgres { major: 18 }));
        assert_eq!(
            Image::parse("postgres:17@sha256:abc"),
            Ok(Image::Postgres { major: 17 })
        );
        assert_eq!(
            Image::parse("bitnami/pgbouncer:1.22.0"),
            Ok(Image::PgBouncer)
        );
        assert_eq!(Image::parse("edoburu/pgbouncer"), Ok(Image::PgBouncer));
    }

    #[test]
    fn refuses_other_images_with_a_reason() {
        let err = Image::parse("nginx:1.27").unwrap_err();
        assert!(
            err.contains("not supported by the pgshift process kubelet"),
            "{err}"
        );
        assert_eq!(
            Image::parse("postgres:10"),
            Ok(Image::Postgres { major: 10 })
        );
        assert_eq!(
            Image::parse("postgres:12.22-bullseye"),
            Ok(Image::Postgres { major: 12 })
        );
        let err = Image::parse("postgres:9.6").unwrap_err();
        assert!(err.contains("postgres:10..18"), "{err}");
    }
}
