//! The AWS shared configuration files that the AWS CLI and SDKs read, and
//! object_store does not: `~/.aws/credentials` and `~/.aws/config`.
//!
//! The profile is the one `AWS_PROFILE` names, else `default`. Its `region`
//! and `endpoint_url` fill what the environment leaves unset. Its
//! credentials serve where neither the environment's keys nor the
//! statement's `OPTIONS` give keys, from the first of, in the AWS CLI's
//! order:
//!
//! 1. `role_arn`, assumed through STS ([`super::assume_role`]) with the
//!    credentials of its `source_profile` (of any kind here, roles
//!    included) or of its `credential_source` (what object_store finds
//!    without keys); with a `web_identity_token_file` instead, object_store
//!    assumes it with the token;
//! 2. static keys (`aws_access_key_id`, `aws_secret_access_key`,
//!    `aws_session_token`);
//! 3. `credential_process`, a command that prints them
//!    ([`super::credential_process`]).
//!
//! Web identity from the environment comes before 2 and 3, and container
//! and instance credentials (which object_store finds itself) after them
//! all. STS is asked in the store's region, the statement's if it gives
//! one, through `AWS_ENDPOINT_URL_STS`, `AWS_ENDPOINT_URL` or the profile's
//! `endpoint_url`, else the region's own. A profile whose credentials come
//! otherwise (SSO, an MFA code) fails the request with an error that says
//! so, unless keys come from elsewhere.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::StaticCredentialProvider;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredential, AwsCredentialProvider};

use super::assume_role::{AssumeRole, RoleSettings};
use super::credential_process::CredentialProcess;
use super::expiring_credentials::Refreshing;

/// Where a profile's credentials come from.
#[derive(Clone, PartialEq, Eq)]
pub enum ProfileCredentials {
    Keys {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
    /// A role assumed with a web identity token (`role_arn` with
    /// `web_identity_token_file`, as on EKS), which object_store assumes.
    WebIdentity {
        role_arn: String,
        token_file: String,
        session_name: Option<String>,
    },
    /// What object_store finds without keys (the environment's keys, web
    /// identity, container or instance credentials): a role's
    /// `credential_source`.
    DefaultChain,
    /// A command that prints them, and the profile that names it.
    Process { profile: String, command: String },
    /// A role assumed with the credentials of another profile.
    AssumeRole {
        role: RoleSettings,
        source: Box<ProfileCredentials>,
    },
    /// A way the profile asks for that Quiver does not follow, said why.
    Unsupported(String),
}

impl fmt::Debug for ProfileCredentials {
    /// Without the secret and the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Keys { access_key_id, .. } => f
                .debug_struct("Keys")
                .field("access_key_id", access_key_id)
                .finish_non_exhaustive(),
            Self::WebIdentity {
                role_arn,
                token_file,
                session_name,
            } => f
                .debug_struct("WebIdentity")
                .field("role_arn", role_arn)
                .field("token_file", token_file)
                .field("session_name", session_name)
                .finish(),
            Self::DefaultChain => f.write_str("DefaultChain"),
            Self::Process { profile, .. } => f
                .debug_struct("Process")
                .field("profile", profile)
                .finish_non_exhaustive(),
            Self::AssumeRole { role, source } => f
                .debug_struct("AssumeRole")
                .field("role", role)
                .field("source", source)
                .finish(),
            Self::Unsupported(reason) => f.debug_tuple("Unsupported").field(reason).finish(),
        }
    }
}

/// What the profile sets, each only where the environment does not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProfileSettings {
    pub credentials: Option<ProfileCredentials>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
}

/// One profile's settings, the credentials file's over the config file's.
type Profile = HashMap<String, String>;

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

    /// The settings of `profile` in the two files' texts.
    pub fn from_files(credentials: &str, config: &str, profile: &str) -> Self {
        let profiles = Profiles {
            credentials: sections(credentials),
            config: sections(config),
        };
        let settings = profiles.get(profile);
        Self {
            credentials: profiles.credentials_of(profile, &mut HashSet::new()),
            region: settings.get("region").cloned(),
            endpoint: settings.get("endpoint_url").cloned(),
        }
    }

    /// `builder`, built from the environment `env`, with the profile's
    /// region and endpoint where it has none.
    pub fn fill(
        &self,
        mut builder: AmazonS3Builder,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> AmazonS3Builder {
        let unset = |variables: &[&str]| variables.iter().all(|name| env(name).is_none());
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

    /// `builder`, complete with the environment `env` and the statement's
    /// options, with the profile's credentials where neither gave keys
    /// (a session token of the profile never goes with another's keys).
    /// Fails for a profile whose credentials come in a way Quiver does not
    /// follow.
    pub fn with_credentials(
        &self,
        builder: AmazonS3Builder,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> object_store::Result<AmazonS3Builder> {
        let Some(credentials) = self.credentials_for(&builder, env) else {
            return Ok(builder);
        };
        Ok(match credentials {
            ProfileCredentials::Keys {
                access_key_id,
                secret_access_key,
                session_token,
            } => {
                remember_keys(secret_access_key, session_token.as_deref());
                let builder = builder
                    .with_access_key_id(access_key_id)
                    .with_secret_access_key(secret_access_key);
                match session_token {
                    Some(token) => builder.with_token(token),
                    None => builder,
                }
            }
            web_identity @ ProfileCredentials::WebIdentity { .. } => {
                with_web_identity(builder, web_identity)
            }
            derived => {
                let provider = self.provider(derived, &builder, env)?;
                builder.with_credentials(provider)
            }
        })
    }

    /// The profile's credentials that `builder` takes: none where keys or
    /// unsigned requests were asked for, and, as the AWS CLI orders them,
    /// web identity from the environment comes before the profile's keys,
    /// web identity and `credential_process`, though not its role.
    fn credentials_for(
        &self,
        builder: &AmazonS3Builder,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<&ProfileCredentials> {
        let keys_given = builder
            .get_config_value(&AmazonS3ConfigKey::AccessKeyId)
            .is_some();
        let unsigned = builder
            .get_config_value(&AmazonS3ConfigKey::SkipSignature)
            .is_some_and(|skip| skip == "true");
        let web_identity = env("AWS_WEB_IDENTITY_TOKEN_FILE").is_some();
        match &self.credentials {
            _ if keys_given || unsigned => None,
            Some(
                ProfileCredentials::Keys { .. }
                | ProfileCredentials::WebIdentity { .. }
                | ProfileCredentials::Process { .. },
            ) if web_identity => None,
            credentials => credentials.as_ref(),
        }
    }

    /// The provider of `credentials`; a role asks STS through the
    /// profile's endpoint for STS, in the region of `builder`.
    fn provider(
        &self,
        credentials: &ProfileCredentials,
        builder: &AmazonS3Builder,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> object_store::Result<AwsCredentialProvider> {
        let region = builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".to_owned());
        Ok(match credentials {
            ProfileCredentials::Keys {
                access_key_id,
                secret_access_key,
                session_token,
            } => {
                remember_keys(secret_access_key, session_token.as_deref());
                let credential = AwsCredential {
                    key_id: access_key_id.clone(),
                    secret_key: secret_access_key.clone(),
                    token: session_token.clone(),
                };
                Arc::new(StaticCredentialProvider::new(credential))
            }
            ProfileCredentials::Process { profile, command } => Arc::new(Refreshing::new(
                CredentialProcess::new(profile.clone(), command.clone()),
            )),
            // What object_store finds without keys: the environment's keys,
            // web identity, container or instance credentials.
            ProfileCredentials::WebIdentity { .. } | ProfileCredentials::DefaultChain => {
                let keyless = AmazonS3Builder::from_env()
                    .with_region(&region)
                    .with_bucket_name("quiver-role-source");
                Arc::clone(
                    with_web_identity(keyless, credentials)
                        .build()?
                        .credentials(),
                )
            }
            ProfileCredentials::AssumeRole { role, source } => {
                let source = self.provider(source, builder, env)?;
                let endpoint = env("AWS_ENDPOINT_URL_STS")
                    .or_else(|| env("AWS_ENDPOINT_URL"))
                    .or_else(|| self.endpoint.clone())
                    .unwrap_or_else(|| sts_endpoint(&region));
                let assume = AssumeRole::new(role.clone(), source, endpoint, region)?;
                Arc::new(Refreshing::new(assume))
            }
            ProfileCredentials::Unsupported(reason) => {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: reason.clone().into(),
                });
            }
        })
    }
}

/// `builder` with the role and token file of `credentials`, if they are a
/// profile's web identity, for object_store to assume the role with.
/// Remembers a profile's keys, to be blanked in any text that leaves the
/// process (see [`super::echoes`]): they last as long as the process.
fn remember_keys(secret_access_key: &str, session_token: Option<&str>) {
    super::echoes::remember_secret(secret_access_key);
    if let Some(token) = session_token {
        super::echoes::remember_secret(token);
    }
}

fn with_web_identity(
    builder: AmazonS3Builder,
    credentials: &ProfileCredentials,
) -> AmazonS3Builder {
    let ProfileCredentials::WebIdentity {
        role_arn,
        token_file,
        session_name,
    } = credentials
    else {
        return builder;
    };
    let builder = builder
        .with_config(AmazonS3ConfigKey::RoleArn, role_arn)
        .with_config(AmazonS3ConfigKey::WebIdentityTokenFile, token_file);
    match session_name {
        Some(name) => builder.with_config(AmazonS3ConfigKey::RoleSessionName, name),
        None => builder,
    }
}

/// The regional STS endpoint of `region`, as the SDKs use by default.
fn sts_endpoint(region: &str) -> String {
    // The China regions are a partition of their own.
    let domain = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("https://sts.{region}.{domain}")
}

/// The sections of the two files.
struct Profiles {
    credentials: HashMap<String, Profile>,
    config: HashMap<String, Profile>,
}

impl Profiles {
    /// The settings of `profile`: the credentials file names sections
    /// `[name]`; the config file `[profile name]`, and `[default]`. Keys in
    /// the credentials file win.
    fn get(&self, profile: &str) -> Profile {
        let config_section = if profile == "default" {
            "default".to_owned()
        } else {
            format!("profile {profile}")
        };
        let mut settings = self
            .config
            .get(&config_section)
            .cloned()
            .unwrap_or_default();
        settings.extend(self.credentials.get(profile).cloned().unwrap_or_default());
        settings.retain(|_, value| !value.is_empty());
        settings
    }

    /// Where the credentials of `profile` come from; `visited` holds the
    /// profiles whose roles led here, to refuse a loop.
    fn credentials_of(
        &self,
        profile: &str,
        visited: &mut HashSet<String>,
    ) -> Option<ProfileCredentials> {
        let settings = self.get(profile);
        let unsupported = |why: String| {
            Some(ProfileCredentials::Unsupported(format!(
                "the AWS profile '{profile}' {why}; give keys in the environment or the \
                 statement's OPTIONS, or use a profile with keys, a credential_process or a \
                 role_arn with a source_profile"
            )))
        };
        if let Some(role_arn) = settings.get("role_arn") {
            if settings.contains_key("mfa_serial") {
                return unsupported(
                    "assumes a role with an MFA code, which Quiver cannot ask".into(),
                );
            }
            let source = match settings.get("source_profile") {
                Some(source) if source == profile => Self::keys(&settings),
                Some(source) if !visited.insert(profile.to_owned()) => {
                    return unsupported(format!("is part of a loop of source profiles ({source})"));
                }
                Some(source) => self.credentials_of(source, visited),
                None => match settings.get("credential_source").map(String::as_str) {
                    Some("Environment" | "Ec2InstanceMetadata" | "EcsContainer") => {
                        Some(ProfileCredentials::DefaultChain)
                    }
                    Some(other) => {
                        return unsupported(format!(
                            "names the credential_source '{other}'; Quiver knows \
                             Environment, Ec2InstanceMetadata and EcsContainer"
                        ));
                    }
                    None => match settings.get("web_identity_token_file") {
                        Some(token_file) => {
                            return Some(ProfileCredentials::WebIdentity {
                                role_arn: role_arn.clone(),
                                token_file: token_file.clone(),
                                session_name: settings.get("role_session_name").cloned(),
                            });
                        }
                        None => {
                            return unsupported(
                                "names a role_arn without a source_profile, a \
                                 credential_source or a web_identity_token_file"
                                    .into(),
                            );
                        }
                    },
                },
            };
            let source = match source {
                None => {
                    return unsupported("names a source_profile that gives no credentials".into());
                }
                // What the chain cannot follow fails it whole.
                Some(ProfileCredentials::Unsupported(reason)) => {
                    return Some(ProfileCredentials::Unsupported(reason));
                }
                Some(source) => source,
            };
            let role = RoleSettings {
                role_arn: role_arn.clone(),
                session_name: settings.get("role_session_name").cloned(),
                external_id: settings.get("external_id").cloned(),
                duration_seconds: match settings.get("duration_seconds") {
                    None => None,
                    Some(text) => match text.parse() {
                        Ok(seconds) => Some(seconds),
                        Err(_) => {
                            return unsupported(format!(
                                "sets duration_seconds to '{text}', which is not a number"
                            ));
                        }
                    },
                },
            };
            return Some(ProfileCredentials::AssumeRole {
                role,
                source: Box::new(source),
            });
        }
        if let Some(keys) = Self::keys(&settings) {
            return Some(keys);
        }
        if settings.contains_key("sso_session") || settings.contains_key("sso_start_url") {
            return unsupported("signs in with SSO, which Quiver does not follow".into());
        }
        settings
            .get("credential_process")
            .map(|command| ProfileCredentials::Process {
                profile: profile.to_owned(),
                command: command.clone(),
            })
    }

    /// The static keys of a profile's settings, if it has both.
    fn keys(settings: &Profile) -> Option<ProfileCredentials> {
        Some(ProfileCredentials::Keys {
            access_key_id: settings.get("aws_access_key_id")?.clone(),
            secret_access_key: settings.get("aws_secret_access_key")?.clone(),
            session_token: settings.get("aws_session_token").cloned(),
        })
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

[profile vault]
credential_process = vault-aws --role lake

[profile admin]
role_arn = arn:aws:iam::123456789012:role/admin
source_profile = vault
role_session_name = nightly
duration_seconds = 900
region = eu-west-1

[profile auditor]
role_arn = arn:aws:iam::123456789012:role/auditor
source_profile = admin
external_id = audit-7

[profile self]
role_arn = arn:aws:iam::123456789012:role/self
source_profile = self
aws_access_key_id = AKIASELF
aws_secret_access_key = self-secret

[profile loop-a]
role_arn = arn:aws:iam::123456789012:role/a
source_profile = loop-b

[profile loop-b]
role_arn = arn:aws:iam::123456789012:role/b
source_profile = loop-a

[profile mfa]
role_arn = arn:aws:iam::123456789012:role/admin
source_profile = lake
mfa_serial = arn:aws:iam::123456789012:mfa/me

[profile instance]
role_arn = arn:aws:iam::123456789012:role/admin
credential_source = Ec2InstanceMetadata

[profile unknown-source]
role_arn = arn:aws:iam::123456789012:role/admin
credential_source = Vault

[profile eks]
role_arn = arn:aws:iam::123456789012:role/pods
web_identity_token_file = /var/run/secrets/token
";

    fn role(name: &str) -> RoleSettings {
        RoleSettings {
            role_arn: format!("arn:aws:iam::123456789012:role/{name}"),
            session_name: None,
            external_id: None,
            duration_seconds: None,
        }
    }

    fn unsupported(profile: &str) -> String {
        match ProfileSettings::from_files(CREDENTIALS, CONFIG, profile).credentials {
            Some(ProfileCredentials::Unsupported(reason)) => reason,
            other => panic!("{profile}: {other:?}"),
        }
    }

    #[test]
    fn a_profile_is_read_from_both_files() {
        assert_eq!(
            ProfileSettings::from_files(CREDENTIALS, CONFIG, "lake"),
            ProfileSettings {
                credentials: Some(ProfileCredentials::Keys {
                    access_key_id: "AKIALAKE".into(),
                    secret_access_key: "lake/secret+with=signs".into(),
                    session_token: Some("lake-token".into()),
                }),
                region: Some("eu-central-1".into()),
                endpoint: Some("http://127.0.0.1:9000".into()),
            }
        );
        let default = ProfileSettings::from_files(CREDENTIALS, CONFIG, "default");
        assert!(matches!(
            default.credentials,
            Some(ProfileCredentials::Keys { ref access_key_id, .. }) if access_key_id == "AKIADEFAULT"
        ));
        assert_eq!(default.region.as_deref(), Some("us-west-2"));
        let sso = ProfileSettings::from_files(CREDENTIALS, CONFIG, "sso");
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
        let filled = profile
            .with_credentials(profile.fill(AmazonS3Builder::new(), &nothing), &nothing)
            .expect("keys");
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
        let filled = profile
            .with_credentials(profile.fill(from_env, &env), &env)
            .expect("keys");
        assert_eq!(
            filled.get_config_value(&Key::AccessKeyId).as_deref(),
            Some("AKIAENV")
        );
        assert_eq!(filled.get_config_value(&Key::SecretAccessKey), None);
        assert_eq!(filled.get_config_value(&Key::Token), None);
        assert_eq!(
            filled.get_config_value(&Key::Region).as_deref(),
            Some("us-east-1")
        );

        // Keys in the statement's options take no token of the profile.
        let from_options = AmazonS3Builder::new()
            .with_access_key_id("AKIAOPTION")
            .with_secret_access_key("option-secret");
        let filled = profile
            .with_credentials(from_options, &nothing)
            .expect("keys");
        assert_eq!(filled.get_config_value(&Key::Token), None);
        // The secret never shows in what is printed for debugging.
        let printed = format!("{profile:?}");
        assert!(
            printed.contains("AKIALAKE") && !printed.contains("lake/secret"),
            "{printed}"
        );
    }

    #[test]
    fn roles_are_followed_through_their_source_profiles() {
        let vault = ProfileCredentials::Process {
            profile: "vault".into(),
            command: "vault-aws --role lake".into(),
        };
        let admin = ProfileCredentials::AssumeRole {
            role: RoleSettings {
                session_name: Some("nightly".into()),
                duration_seconds: Some(900),
                ..role("admin")
            },
            source: Box::new(vault.clone()),
        };
        let profile = |name: &str| ProfileSettings::from_files(CREDENTIALS, CONFIG, name);
        assert_eq!(profile("vault").credentials, Some(vault));
        assert_eq!(profile("admin").credentials, Some(admin.clone()));
        assert_eq!(profile("admin").region.as_deref(), Some("eu-west-1"));
        // A chain of roles; the role itself wins over the profile's keys.
        assert_eq!(
            profile("auditor").credentials,
            Some(ProfileCredentials::AssumeRole {
                role: RoleSettings {
                    external_id: Some("audit-7".into()),
                    ..role("auditor")
                },
                source: Box::new(admin),
            })
        );
        assert_eq!(
            profile("self").credentials,
            Some(ProfileCredentials::AssumeRole {
                role: role("self"),
                source: Box::new(ProfileCredentials::Keys {
                    access_key_id: "AKIASELF".into(),
                    secret_access_key: "self-secret".into(),
                    session_token: None,
                }),
            })
        );
    }

    #[test]
    fn credentials_that_cannot_be_followed_say_why() {
        assert!(unsupported("sso").contains("'sso' signs in with SSO"));
        assert!(unsupported("loop-a").contains("loop of source profiles"));
        assert!(unsupported("mfa").contains("MFA code"));
        assert!(unsupported("unknown-source").contains("credential_source 'Vault'"));
        let error = ProfileSettings::from_files(CREDENTIALS, CONFIG, "sso")
            .with_credentials(AmazonS3Builder::new(), &|_: &str| None)
            .expect_err("refused")
            .to_string();
        assert!(error.contains("give keys in the environment"), "{error}");
        // Keys given otherwise need nothing of the profile.
        let keyed = AmazonS3Builder::new().with_access_key_id("AKIAOPTION");
        assert!(
            ProfileSettings::from_files(CREDENTIALS, CONFIG, "sso")
                .with_credentials(keyed, &|_: &str| None)
                .is_ok()
        );
    }

    #[test]
    fn a_profile_serves_only_where_nothing_else_gives_credentials() {
        let vault = ProfileSettings::from_files(CREDENTIALS, CONFIG, "vault");
        let admin = ProfileSettings::from_files(CREDENTIALS, CONFIG, "admin");
        let lake = ProfileSettings::from_files(CREDENTIALS, CONFIG, "lake");
        let nothing = |_: &str| None;
        let bare = vault.fill(AmazonS3Builder::new(), &nothing);
        assert!(vault.credentials_for(&bare, &nothing).is_some());
        assert!(lake.credentials_for(&bare, &nothing).is_some());
        // Keys from the environment or the statement's options win, and so
        // do unsigned requests; web identity from the environment wins over
        // keys and a process, not a role.
        let keyed = AmazonS3Builder::new().with_access_key_id("AKIAOPTION");
        assert!(vault.credentials_for(&keyed, &nothing).is_none());
        let unsigned = AmazonS3Builder::new().with_skip_signature(true);
        assert!(vault.credentials_for(&unsigned, &nothing).is_none());
        let web_identity = |name: &str| {
            (name == "AWS_WEB_IDENTITY_TOKEN_FILE").then(|| "/var/run/token".to_owned())
        };
        assert!(vault.credentials_for(&bare, &web_identity).is_none());
        assert!(lake.credentials_for(&bare, &web_identity).is_none());
        assert!(admin.credentials_for(&bare, &web_identity).is_some());
    }

    #[test]
    fn roles_of_instances_and_of_web_identities_are_followed() {
        let profile = |name: &str| ProfileSettings::from_files(CREDENTIALS, CONFIG, name);
        assert_eq!(
            profile("instance").credentials,
            Some(ProfileCredentials::AssumeRole {
                role: role("admin"),
                source: Box::new(ProfileCredentials::DefaultChain),
            })
        );
        let eks = ProfileCredentials::WebIdentity {
            role_arn: "arn:aws:iam::123456789012:role/pods".into(),
            token_file: "/var/run/secrets/token".into(),
            session_name: None,
        };
        assert_eq!(profile("eks").credentials, Some(eks));
        // object_store assumes a web identity's role itself.
        let nothing = |_: &str| None;
        let built = profile("eks")
            .with_credentials(AmazonS3Builder::new(), &nothing)
            .expect("web identity");
        assert_eq!(
            built
                .get_config_value(&Key::WebIdentityTokenFile)
                .as_deref(),
            Some("/var/run/secrets/token")
        );
        assert_eq!(
            built.get_config_value(&Key::RoleArn).as_deref(),
            Some("arn:aws:iam::123456789012:role/pods")
        );
    }

    #[test]
    fn roles_are_assumed_through_their_regions_sts() {
        assert_eq!(
            sts_endpoint("eu-west-1"),
            "https://sts.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            sts_endpoint("cn-north-1"),
            "https://sts.cn-north-1.amazonaws.com.cn"
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
        assert_eq!(
            read,
            ProfileSettings::from_files(CREDENTIALS, CONFIG, "lake")
        );
        assert_eq!(read.region.as_deref(), Some("eu-central-1"));
    }
}
