//! The AWS shared configuration files that the AWS CLI and SDKs read, and
//! object_store does not: `~/.aws/credentials` and `~/.aws/config`.
//!
//! The profile is the one `AWS_PROFILE` names, else `default`. Its static
//! keys (`aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`)
//! and its `region` and `endpoint_url` fill what the environment leaves
//! unset, as in the SDKs' chain: environment variables first, then the
//! profile, then web identity, container and instance credentials (which
//! object_store finds itself). A statement's `OPTIONS` override them all.
//! Profiles that get credentials otherwise (SSO, `credential_process`,
//! `role_arn`) are not read: give keys or use the environment.

use std::collections::HashMap;
use std::path::PathBuf;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};

/// What the profile sets, each only where the environment does not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProfileSettings {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
}

impl ProfileSettings {
    /// Reads the profile that `env` (the process environment in use) names
    /// from the files it points to; empty if there is none.
    pub fn read(env: &dyn Fn(&str) -> Option<String>) -> Self {
        let home = env("HOME").map(PathBuf::from);
        let file = |variable: &str, default: &str| {
            env(variable)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|home| home.join(".aws").join(default)))
                .and_then(|path| std::fs::read_to_string(path).ok())
                .unwrap_or_default()
        };
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        Self::from_files(
            &file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            &file("AWS_CONFIG_FILE", "config"),
            &profile,
        )
    }

    /// The settings of `profile` in the two files' texts. The credentials
    /// file names sections `[name]`; the config file `[profile name]`, and
    /// `[default]`. Keys in the credentials file win.
    pub fn from_files(credentials: &str, config: &str, profile: &str) -> Self {
        let credentials = sections(credentials);
        let config = sections(config);
        let config_section = if profile == "default" {
            "default".to_owned()
        } else {
            format!("profile {profile}")
        };
        let empty = HashMap::new();
        let from_credentials = credentials.get(profile).unwrap_or(&empty);
        let from_config = config.get(&config_section).unwrap_or(&empty);
        let value = |key: &str| {
            from_credentials
                .get(key)
                .or_else(|| from_config.get(key))
                .filter(|value| !value.is_empty())
                .cloned()
        };
        Self {
            access_key_id: value("aws_access_key_id"),
            secret_access_key: value("aws_secret_access_key"),
            session_token: value("aws_session_token"),
            region: value("region"),
            endpoint: value("endpoint_url"),
        }
    }

    /// `builder`, built from the environment `env`, with these settings
    /// where it has none. Keys go only as a pair, and only when the
    /// environment gives no key.
    pub fn fill(
        &self,
        mut builder: AmazonS3Builder,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> AmazonS3Builder {
        let unset = |variables: &[&str]| variables.iter().all(|name| env(name).is_none());
        if let (Some(key), Some(secret)) = (&self.access_key_id, &self.secret_access_key)
            && unset(&["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
        {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
            if let Some(token) = &self.session_token {
                builder = builder.with_token(token);
            }
        }
        if let Some(region) = &self.region
            && unset(&["AWS_REGION", "AWS_DEFAULT_REGION"])
        {
            builder = builder.with_config(AmazonS3ConfigKey::Region, region);
        }
        if let Some(endpoint) = &self.endpoint
            && unset(&["AWS_ENDPOINT", "AWS_ENDPOINT_URL"])
        {
            builder = builder.with_endpoint(endpoint);
        }
        builder
    }
}

/// The `key = value` pairs of each `[section]` of an INI text; comments
/// (`#`, `;`) and nested (indented) settings are skipped.
fn sections(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((key, value))) = (&current, line.split_once('=')) {
            sections
                .entry(section.clone())
                .or_default()
                .insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use object_store::aws::AmazonS3ConfigKey as Key;

    use super::*;

    const CREDENTIALS: &str = "\
[default]
aws_access_key_id = AKIADEFAULT
aws_secret_access_key = default-secret

# a comment
[lake]
aws_access_key_id=AKIALAKE
aws_secret_access_key = lake/secret+with=signs
aws_session_token = lake-token
";
    const CONFIG: &str = "\
[default]
region = us-west-2

[profile lake]
region = eu-central-1
endpoint_url = http://127.0.0.1:9000
s3 =
    addressing_style = path
[profile sso]
sso_start_url = https://example.invalid/start
region = ap-south-1
";

    #[test]
    fn a_profile_is_read_from_both_files() {
        assert_eq!(
            ProfileSettings::from_files(CREDENTIALS, CONFIG, "lake"),
            ProfileSettings {
                access_key_id: Some("AKIALAKE".into()),
                secret_access_key: Some("lake/secret+with=signs".into()),
                session_token: Some("lake-token".into()),
                region: Some("eu-central-1".into()),
                endpoint: Some("http://127.0.0.1:9000".into()),
            }
        );
        let default = ProfileSettings::from_files(CREDENTIALS, CONFIG, "default");
        assert_eq!(default.access_key_id.as_deref(), Some("AKIADEFAULT"));
        assert_eq!(default.region.as_deref(), Some("us-west-2"));
        // A profile without keys gives only what it has.
        let sso = ProfileSettings::from_files(CREDENTIALS, CONFIG, "sso");
        assert_eq!(sso.access_key_id, None);
        assert_eq!(sso.region.as_deref(), Some("ap-south-1"));
        assert_eq!(
            ProfileSettings::from_files("", "", "missing"),
            ProfileSettings::default()
        );
    }

    #[test]
    fn the_environment_wins_over_the_profile() {
        let profile = ProfileSettings::from_files(CREDENTIALS, CONFIG, "lake");
        let nothing = |_: &str| None;
        let filled = profile.fill(AmazonS3Builder::new(), &nothing);
        assert_eq!(
            filled.get_config_value(&Key::AccessKeyId).as_deref(),
            Some("AKIALAKE")
        );
        assert_eq!(
            filled.get_config_value(&Key::Token).as_deref(),
            Some("lake-token")
        );
        assert_eq!(
            filled.get_config_value(&Key::Region).as_deref(),
            Some("eu-central-1")
        );
        assert_eq!(
            filled.get_config_value(&Key::Endpoint).as_deref(),
            Some("http://127.0.0.1:9000")
        );

        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("AKIAENV".to_owned()),
            "AWS_REGION" => Some("us-east-1".to_owned()),
            _ => None,
        };
        let from_env = AmazonS3Builder::new()
            .with_access_key_id("AKIAENV")
            .with_region("us-east-1");
        let filled = profile.fill(from_env, &env);
        assert_eq!(
            filled.get_config_value(&Key::AccessKeyId).as_deref(),
            Some("AKIAENV")
        );
        assert_eq!(filled.get_config_value(&Key::SecretAccessKey), None);
        assert_eq!(
            filled.get_config_value(&Key::Region).as_deref(),
            Some("us-east-1")
        );
    }

    #[test]
    fn the_files_are_found_where_the_environment_says() {
        let folder = tempfile::tempdir().expect("temp folder");
        let credentials = folder.path().join("creds");
        std::fs::write(&credentials, CREDENTIALS).expect("write");
        let home = folder.path().join("home");
        std::fs::create_dir_all(home.join(".aws")).expect("folders");
        std::fs::write(home.join(".aws").join("config"), CONFIG).expect("write");
        let env = |name: &str| match name {
            "HOME" => Some(home.display().to_string()),
            "AWS_SHARED_CREDENTIALS_FILE" => Some(credentials.display().to_string()),
            "AWS_PROFILE" => Some("lake".to_owned()),
            _ => None,
        };
        let read = ProfileSettings::read(&env);
        assert_eq!(read.access_key_id.as_deref(), Some("AKIALAKE"));
        assert_eq!(read.region.as_deref(), Some("eu-central-1"));
    }
}
