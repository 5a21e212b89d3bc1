//! Per-location store options, as written in `OPTIONS (...)` of `CREATE
//! EXTERNAL TABLE` or `COPY`: `aws.*`, `gcp.*`, `azure.*` and `http.*` keys.
//!
//! The keys are the ones `object_store` understands (`aws.region`,
//! `aws.endpoint`, `gcp.service_account_key`, `azure.account_name`, ...), with
//! the `aws_`-style spellings accepted too. Unknown keys are refused when the
//! statement is planned, so a typo never silently falls back to defaults.
//!
//! Values may be secrets. They are stored and sent to executors, but
//! [`StoreOptions`]'s `Display`, `Debug` and [`redact_sql`] show every value
//! except a short list of known harmless ones as `***`.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use datafusion::common::config::{ConfigEntry, ConfigExtension, ExtensionOptions};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::session_state::SessionState;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};
use object_store::aws::AmazonS3ConfigKey;
use object_store::azure::AzureConfigKey;
use object_store::gcp::GoogleConfigKey;
use object_store::{ClientConfigKey, ObjectStoreScheme};

use url::Url;

use super::echoes::redact_store_echoes;

/// The option prefixes, one per kind of store.
pub const PROVIDERS: [&str; 4] = ["aws", "gcp", "azure", "http"];

/// Option names whose values are shown as they are; every other value is
/// treated as a secret.
const HARMLESS_OPTIONS: &[&str] = &[
    "region",
    "aws_region",
    "default_region",
    "endpoint",
    "endpoint_url",
    "aws_endpoint",
    "allow_http",
    "aws_allow_http",
    "virtual_hosted_style_request",
    "skip_signature",
    "bucket",
    "account_name",
    "azure_storage_account_name",
    "container_name",
    "use_emulator",
    "timeout",
    "connect_timeout",
];

const REDACTED: &str = "***";

/// Checks that `name` (without its prefix) is an option of `provider`.
pub fn validate_option(provider: &str, name: &str) -> Result<(), String> {
    let name = name.to_ascii_lowercase();
    let Some(known) = is_option_of_store_kind(provider, &name) else {
        return Err(format!("unknown store option prefix '{provider}'"));
    };
    if known || ClientConfigKey::from_str(&name).is_ok() {
        Ok(())
    } else {
        Err(format!("unknown store option '{provider}.{name}'"))
    }
}

/// Whether lower-case `name` is an option of the kind of store `provider`
/// names, not counting the HTTP client's options that every kind takes;
/// `None` for an unknown provider.
fn is_option_of_store_kind(provider: &str, name: &str) -> Option<bool> {
    Some(match provider {
        "aws" => AmazonS3ConfigKey::from_str(name).is_ok(),
        "gcp" => GoogleConfigKey::from_str(name).is_ok(),
        "azure" => AzureConfigKey::from_str(name).is_ok(),
        "http" => super::http_credentials::is_credential_option(name),
        _ => return None,
    })
}

/// How the environment variables of each kind of store start.
const ENVIRONMENT_STARTS: [(&str, &str); 3] =
    [("aws_", "aws"), ("google_", "gcp"), ("azure_", "azure")];

/// The kinds of store of which option `key`, written without a store's
/// prefix (`secret_access_key`, `aws_session_token`, `format.password`), is
/// an option: object_store takes such spellings, but DataFusion takes them
/// for format options. Empty for a format option.
fn store_kinds_of_unprefixed(key: &str) -> Vec<&'static str> {
    let name = unprefixed_name(key);
    // As an environment variable is spelled: its start names the kind.
    let by_start = ENVIRONMENT_STARTS
        .into_iter()
        .find_map(|(start, provider)| name.starts_with(start).then_some(provider));
    if let Some(provider) = by_start {
        return match validate_option(provider, &name) {
            Ok(()) => vec![provider],
            Err(_) => Vec::new(),
        };
    }
    PROVIDERS
        .into_iter()
        .filter(|provider| is_option_of_store_kind(provider, &name) == Some(true))
        .collect()
}

/// Option `key` as written, lower-case, without the `format.` that
/// DataFusion puts before a key with no prefix.
fn unprefixed_name(key: &str) -> String {
    key.strip_prefix("format.")
        .unwrap_or(key)
        .to_ascii_lowercase()
}

/// Refuses a store option written without its store's prefix
/// ([`store_kinds_of_unprefixed`]): it would be taken for a format option,
/// and either refused later, after DataFusion's logs of the plan printed
/// it, secret and all, or ignored (`STORED AS ARROW` takes no options),
/// its credentials never used and the statement kept in the job history
/// and table definitions as written. The value is not repeated.
fn refuse_unprefixed_store_option(key: &str) -> Result<(), String> {
    let kinds = store_kinds_of_unprefixed(key);
    if kinds.is_empty() {
        return Ok(());
    }
    let name = unprefixed_name(key);
    // `aws_secret_access_key` as `aws.secret_access_key`, where that is one.
    let short = |kind: &str| {
        ENVIRONMENT_STARTS
            .iter()
            .find(|(_, provider)| *provider == kind)
            .and_then(|(start, _)| name.strip_prefix(start))
            .filter(|short| validate_option(kind, short).is_ok())
            .unwrap_or(&name)
    };
    let spellings: Vec<String> = kinds
        .iter()
        .map(|kind| format!("'{kind}.{}'", short(kind)))
        .collect();
    Err(format!(
        "option '{name}' is a store option: write it with its store's prefix, as {}",
        spellings.join(" or ")
    ))
}

/// Whether option `name` of `provider` is the address of the store's service.
fn is_endpoint(provider: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    match provider {
        "aws" => matches!(
            AmazonS3ConfigKey::from_str(&name),
            Ok(AmazonS3ConfigKey::Endpoint)
        ),
        "azure" => matches!(
            AzureConfigKey::from_str(&name),
            Ok(AzureConfigKey::Endpoint)
        ),
        _ => false,
    }
}

/// An endpoint must be an `http://` or `https://` address with a host and no
/// credentials: object_store panics on one without a scheme, and logs the
/// address of every connection it opens. The value is not repeated: it may
/// hold a password.
fn check_endpoint(key: &str, value: &str) -> Result<(), String> {
    let valid = value == value.trim()
        && Url::parse(value).is_ok_and(|url| {
            matches!(url.scheme(), "http" | "https")
                && url.host_str().is_some_and(|host| !host.is_empty())
                && url.username().is_empty()
                && url.password().is_none()
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "option '{key}' must be an http:// or https:// address with a host and without \
             credentials, such as 'https://s3.eu-west-1.amazonaws.com'"
        ))
    }
}

/// Whether the value of option `key` (`aws.region`, or just `region`) may be shown.
pub fn is_harmless(key: &str) -> bool {
    let name = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    HARMLESS_OPTIONS.contains(&name.as_str())
}

/// The store options of one location: full keys (`aws.region`) to values.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct StoreOptions(BTreeMap<String, String>);

impl StoreOptions {
    /// Picks the store options out of a statement's `OPTIONS`, checking every key.
    pub fn from_statement_options(options: &HashMap<String, String>) -> DfResult<Self> {
        let mut picked = BTreeMap::new();
        for (key, value) in options {
            refuse_unprefixed_store_option(key).map_err(DataFusionError::Configuration)?;
            let Some((provider, name)) = key.split_once('.') else {
                continue;
            };
            if PROVIDERS.contains(&provider) {
                validate_option(provider, name).map_err(DataFusionError::Configuration)?;
                if is_endpoint(provider, name) {
                    check_endpoint(key, value).map_err(DataFusionError::Configuration)?;
                }
                picked.insert(key.to_ascii_lowercase(), value.clone());
            }
        }
        Ok(Self(picked))
    }

    /// Fails if options of one kind of store are given for a location of
    /// another kind: they would be ignored, and the data read or written
    /// elsewhere than meant (a mistyped `s3//bucket/` is a local path).
    pub fn check_apply_to(&self, written: &str, location: &Url) -> DfResult<()> {
        let (kind, provider) = match ObjectStoreScheme::parse(location) {
            Ok((ObjectStoreScheme::AmazonS3, _)) => ("an S3 location", Some("aws")),
            Ok((ObjectStoreScheme::GoogleCloudStorage, _)) => ("a GCS location", Some("gcp")),
            Ok((ObjectStoreScheme::MicrosoftAzure, _)) => ("an Azure location", Some("azure")),
            Ok((ObjectStoreScheme::Http, _)) => ("a web address", Some("http")),
            Ok((ObjectStoreScheme::Local, _)) => ("a local path", None),
            _ => ("a location of no store options", None),
        };
        let foreign = self
            .0
            .keys()
            .filter_map(|key| key.split_once('.').map(|(prefix, _)| prefix))
            .find(|prefix| Some(*prefix) != provider);
        match foreign {
            None => Ok(()),
            Some(prefix) => Err(DataFusionError::Configuration(format!(
                "the options '{prefix}.*' are not for '{written}', which is {kind} ({}); \
                 check how the location is spelled (as in 's3://bucket/folder/')",
                location.as_str()
            ))),
        }
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(pairs.into_iter().collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    /// The options of one provider, without their prefix.
    pub fn for_provider<'a>(
        &'a self,
        provider: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.0.iter().filter_map(move |(key, value)| {
            let (prefix, name) = key.split_once('.')?;
            (prefix == provider).then_some((name, value.as_str()))
        })
    }
}

impl fmt::Display for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (key, value) in &self.0 {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            let shown = if is_harmless(key) { value } else { REDACTED };
            write!(f, "{key}={shown}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreOptions({self})")
    }
}

/// `sql` with the values of its secret store options (and any password in a
/// location) replaced by `'***'`, for
/// logs, job records and table definitions. Each `OPTIONS (...)` clause is
/// read token by token, so a value is found however it is written (quoted,
/// double-quoted, a bare word or a number); text that cannot be read loses
/// everything after `OPTIONS`.
pub fn redact_sql(sql: &str) -> String {
    // A location's password, which Quiver refuses, is blanked too.
    let without_passwords = redact_store_echoes(sql);
    let sql: &str = &without_passwords;
    let lower = sql.to_ascii_lowercase();
    let Some(options_at) = lower.find("options") else {
        return sql.to_owned();
    };
    match secret_value_spans(sql) {
        Some(mut spans) => {
            let mut redacted = sql.to_owned();
            // From the end, so that earlier offsets stay valid.
            spans.sort_unstable_by_key(|span| std::cmp::Reverse(span.0));
            for (start, end) in spans {
                redacted.replace_range(start..end, &format!("'{REDACTED}'"));
            }
            redacted
        }
        None => format!("{}OPTIONS (***)", &sql[..options_at]),
    }
}

/// `error`, from planning the statement `sql`, without the secrets of
/// `sql`'s store options. DataFusion echoes statements it does not take
/// ("Unsupported SQL statement: CREATE TABLE ... OPTIONS('aws.secret_access_key'
/// = '...')"), and the parser quotes the token it stumbled on, which in a
/// clause it refuses may be a secret in a form it does not take (`X'...'`,
/// `$$...$$`, a value cut in two by a `+` or `/`, or by a digit it starts
/// with). So every value written after a secret store option's key (`=`
/// or `:` between them or not) is blanked wherever the error repeats it,
/// and the parser's "found: <token> at Line: l, Column: c" is blanked when
/// the token lies after an `OPTIONS` keyword.
pub fn redact_statement_error(error: DataFusionError, sql: &str) -> DataFusionError {
    let secrets = secret_values(sql);
    without_secrets(error, sql, &secrets)
}

fn without_secrets(error: DataFusionError, sql: &str, secrets: &[String]) -> DataFusionError {
    let blank = |message: String| blank_all(message, secrets);
    match error {
        DataFusionError::SQL(parser_error, backtrace) => {
            let parser_error = match *parser_error {
                ParserError::ParserError(message) => {
                    ParserError::ParserError(blank(without_quoted_option_token(&message, sql)))
                }
                ParserError::TokenizerError(message) => ParserError::TokenizerError(blank(message)),
                other => other,
            };
            DataFusionError::SQL(Box::new(parser_error), backtrace)
        }
        // The diagnostic repeats the message; the error alone is kept.
        DataFusionError::Diagnostic(_, inner) => without_secrets(*inner, sql, secrets),
        DataFusionError::Context(context, inner) => DataFusionError::Context(
            blank(context),
            Box::new(without_secrets(*inner, sql, secrets)),
        ),
        DataFusionError::NotImplemented(message) => DataFusionError::NotImplemented(blank(message)),
        DataFusionError::Plan(message) => DataFusionError::Plan(blank(message)),
        DataFusionError::Configuration(message) => DataFusionError::Configuration(blank(message)),
        DataFusionError::Execution(message) => DataFusionError::Execution(blank(message)),
        other => {
            let text = other.to_string();
            let blanked = blank(text.clone());
            if blanked == text {
                other
            } else {
                DataFusionError::Plan(blanked)
            }
        }
    }
}

/// `message` with every occurrence of each of `secrets` replaced by `***`.
fn blank_all(mut message: String, secrets: &[String]) -> String {
    for secret in secrets {
        if message.contains(secret.as_str()) {
            message = message.replace(secret.as_str(), REDACTED);
        }
    }
    message
}

/// Secrets shorter than this are not looked for in errors: blanking every
/// `1` or `ab` of a message would ruin it, and no credential is so short.
const SHORTEST_SECRET: usize = 4;

/// Tokens that [`secret_values`] takes for one value at most.
const MOST_VALUE_TOKENS: usize = 8;

/// What `sql` writes after each key of a secret store option, up to the
/// next `,` or `)`: the text of every token there but the signs `=` and
/// `:` (a value the parser splits, `123abc`, is several tokens). Empty if
/// `sql` cannot be read as tokens; the parser then fails on it too, and its
/// errors do not echo the statement.
fn secret_values(sql: &str) -> Vec<String> {
    let dialect = GenericDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize() else {
        return Vec::new();
    };
    let tokens: Vec<Token> = tokens
        .into_iter()
        .filter(|token| !matches!(token, Token::Whitespace(_)))
        .collect();
    let mut secrets = Vec::new();
    let mut index = 0;
    // Within `OPTIONS (...)`, where a store option without its prefix is
    // taken for one too (elsewhere `token` may be a column).
    let mut in_options = false;
    while index < tokens.len() {
        match &tokens[index] {
            Token::Word(word)
                if word.value.eq_ignore_ascii_case("options")
                    && matches!(tokens.get(index + 1), Some(Token::LParen)) =>
            {
                in_options = true;
                index += 2;
                continue;
            }
            Token::RParen => in_options = false,
            _ => {}
        }
        let Some(mut key) = key_part(&tokens[index]) else {
            index += 1;
            continue;
        };
        let mut next = index + 1;
        while matches!(tokens.get(next), Some(Token::Period))
            && let Some(part) = tokens.get(next + 1).and_then(key_part)
        {
            key.push('.');
            key.push_str(&part);
            next += 2;
        }
        index = next;
        let for_a_store =
            is_store_option(&key) || (in_options && !store_kinds_of_unprefixed(&key).is_empty());
        if !for_a_store || is_harmless(&key) {
            continue;
        }
        // A value is a token or a few; a key used elsewhere (a column) is
        // not followed by the rest of the statement.
        let value_end = (index + MOST_VALUE_TOKENS).min(tokens.len());
        while let Some(token) = tokens.get(index).filter(|_| index < value_end) {
            match token {
                Token::Comma | Token::RParen | Token::SemiColon | Token::EOF => break,
                Token::Eq | Token::Colon | Token::DoubleColon => {}
                value => {
                    let text = token_text(value);
                    if text.chars().count() >= SHORTEST_SECRET {
                        secrets.push(text);
                    }
                }
            }
            index += 1;
        }
    }
    secrets
}

/// A token's text as an error would quote it: a literal's content, a
/// word's value, anything else as written.
fn token_text(token: &Token) -> String {
    match token {
        Token::SingleQuotedString(text)
        | Token::DoubleQuotedString(text)
        | Token::EscapedStringLiteral(text)
        | Token::NationalStringLiteral(text)
        | Token::HexStringLiteral(text)
        | Token::SingleQuotedByteStringLiteral(text)
        | Token::DoubleQuotedByteStringLiteral(text)
        | Token::UnicodeStringLiteral(text) => text.clone(),
        Token::DollarQuotedString(dollar) => dollar.value.clone(),
        Token::Word(word) => word.value.clone(),
        Token::Number(number, _) => number.clone(),
        other => other.to_string(),
    }
}

/// `message` with the token after its last "found: " replaced by `***` if
/// the location that follows it (or, without one, any place) is after an
/// `OPTIONS` keyword of `sql`.
fn without_quoted_option_token(message: &str, sql: &str) -> String {
    const FOUND: &str = "found: ";
    const AT_LINE: &str = " at Line: ";
    let lower = sql.to_ascii_lowercase();
    let Some(first_options) = lower.find("options") else {
        return message.to_owned();
    };
    let Some(found_at) = message.rfind(FOUND) else {
        return message.to_owned();
    };
    let token_start = found_at + FOUND.len();
    let (token_end, location) = match message[token_start..].rfind(AT_LINE) {
        Some(offset) => {
            let at = token_start + offset;
            (at, parse_location(&message[at + AT_LINE.len()..]))
        }
        None => (message.len(), None),
    };
    let token = &message[token_start..token_end];
    let after_options = match location.and_then(|at| LineOffsets::new(sql).byte(sql, at)) {
        Some(offset) => offset > first_options,
        // Without a location, assume the worst.
        None => true,
    };
    if !after_options || token == "EOF" {
        return message.to_owned();
    }
    format!(
        "{}{REDACTED}{}",
        &message[..token_start],
        &message[token_end..]
    )
}

/// The location in "<line>, Column: <column>", as the parser writes it.
fn parse_location(text: &str) -> Option<Location> {
    let (line, rest) = text.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some(Location::new(line.parse().ok()?, column.parse().ok()?))
}

/// The byte ranges of the secret values in every `OPTIONS (key value, ...)`
/// clause of `sql`, or `None` if a clause cannot be read.
fn secret_value_spans(sql: &str) -> Option<Vec<(usize, usize)>> {
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .ok()?;
    let tokens: Vec<&TokenWithSpan> = tokens
        .iter()
        .filter(|token| !matches!(token.token, Token::Whitespace(_)))
        .collect();
    let offsets = LineOffsets::new(sql);
    let mut spans = Vec::new();
    let mut index = 0;
    while index < tokens.len() {
        let opens_options = matches!(&tokens[index].token, Token::Word(word) if word.value.eq_ignore_ascii_case("options"))
            && matches!(
                tokens.get(index + 1).map(|token| &token.token),
                Some(Token::LParen)
            );
        if !opens_options {
            index += 1;
            continue;
        }
        index += 2;
        // Pairs of a key (a quoted string, or words joined by dots) and a value.
        loop {
            let mut key = key_part(&tokens.get(index)?.token)?;
            index += 1;
            while matches!(tokens.get(index)?.token, Token::Period) {
                key.push('.');
                key.push_str(&key_part(&tokens.get(index + 1)?.token)?);
                index += 2;
            }
            let value = tokens.get(index)?;
            // A store option without its prefix is refused, but the
            // statement may still be logged or echoed before it is.
            let for_a_store = is_store_option(&key) || !store_kinds_of_unprefixed(&key).is_empty();
            if for_a_store && !is_harmless(&key) {
                spans.push((
                    offsets.byte(sql, value.span.start)?,
                    offsets.byte(sql, value.span.end)?,
                ));
            }
            index += 1;
            match tokens.get(index)?.token {
                Token::Comma => index += 1,
                Token::RParen => break,
                _ => return None,
            }
        }
    }
    Some(spans)
}

/// One dot-separated part of an option key: a word or a quoted string.
fn key_part(token: &Token) -> Option<String> {
    match token {
        Token::Word(word) => Some(word.value.clone()),
        Token::SingleQuotedString(text) | Token::DoubleQuotedString(text) => Some(text.clone()),
        _ => None,
    }
}

/// Turns the tokenizer's line and column locations into byte offsets.
struct LineOffsets(Vec<usize>);

impl LineOffsets {
    fn new(sql: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(sql.match_indices('\n').map(|(at, _)| at + 1))
            .collect();
        Self(starts)
    }

    /// The byte offset of a 1-based line and character column.
    fn byte(&self, sql: &str, location: Location) -> Option<usize> {
        let line_start = *self
            .0
            .get(usize::try_from(location.line).ok()?.checked_sub(1)?)?;
        let column = usize::try_from(location.column).ok()?.checked_sub(1)?;
        let line = &sql[line_start..];
        let within = line
            .char_indices()
            .map(|(at, _)| at)
            .chain(std::iter::once(line.len()))
            .nth(column)?;
        Some(line_start + within)
    }
}

/// Whether `key` is a store option (`aws.*`, `gcp.*`, `azure.*`, `http.*`).
pub fn is_store_option(key: &str) -> bool {
    key.split_once('.')
        .is_some_and(|(prefix, _)| PROVIDERS.contains(&prefix.to_ascii_lowercase().as_str()))
}

/// Makes DataFusion accept `aws.*`, `gcp.*`, `azure.*` and `http.*` keys in
/// table and `COPY` options; the values are read from the statement itself.
pub fn register_store_option_namespaces(state: &mut SessionState) {
    state.register_table_options_extension(StoreOptionNamespace::<Aws>::default());
    state.register_table_options_extension(StoreOptionNamespace::<Gcp>::default());
    state.register_table_options_extension(StoreOptionNamespace::<Azure>::default());
    state.register_table_options_extension(StoreOptionNamespace::<Http>::default());
}

/// One kind of store, named by its option prefix.
pub trait Provider: Send + Sync + fmt::Debug + Default + Clone + 'static {
    const PREFIX: &'static str;
}

macro_rules! provider {
    ($name:ident, $prefix:literal) => {
        #[derive(Debug, Default, Clone, Copy)]
        pub struct $name;
        impl Provider for $name {
            const PREFIX: &'static str = $prefix;
        }
    };
}
provider!(Aws, "aws");
provider!(Gcp, "gcp");
provider!(Azure, "azure");
provider!(Http, "http");

/// A table-options namespace that checks its keys and keeps values redacted.
#[derive(Debug, Default, Clone)]
pub struct StoreOptionNamespace<P: Provider> {
    values: BTreeMap<String, String>,
    provider: std::marker::PhantomData<P>,
}

impl<P: Provider> ExtensionOptions for StoreOptionNamespace<P> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn cloned(&self) -> Box<dyn ExtensionOptions> {
        Box::new(self.clone())
    }

    fn set(&mut self, key: &str, value: &str) -> DfResult<()> {
        // DataFusion passes table-option keys with their prefix.
        let key = key
            .strip_prefix(P::PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(key);
        validate_option(P::PREFIX, key).map_err(DataFusionError::Configuration)?;
        self.values
            .insert(key.to_ascii_lowercase(), value.to_owned());
        Ok(())
    }

    fn entries(&self) -> Vec<ConfigEntry> {
        self.values
            .iter()
            .map(|(key, value)| ConfigEntry {
                key: format!("{}.{key}", P::PREFIX),
                value: Some(if is_harmless(key) {
                    value.clone()
                } else {
                    REDACTED.to_owned()
                }),
                description: "object store option",
            })
            .collect()
    }
}

impl<P: Provider> ConfigExtension for StoreOptionNamespace<P> {
    const PREFIX: &'static str = P::PREFIX;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parser_error_inside_options_does_not_quote_the_value() {
        let parse_error =
            |sql: &str| datafusion::sql::parser::DFParser::parse_sql(sql).expect_err(sql);
        let copy = "COPY (SELECT 1) TO 's3://lake/out/' STORED AS PARQUET OPTIONS ";
        for (options, secret) in [
            // A value starting with digits is read as a number and a word.
            ("('aws.secret_access_key' 123SECRETTAIL)", "SECRETTAIL"),
            (
                "('aws.secret_access_key' X'5345435245540A')",
                "5345435245540A",
            ),
            (
                "('aws.region' 'eu-west-1',\n 'aws.secret_access_key' $$DOLLARSECRET$$)",
                "DOLLARSECRET",
            ),
        ] {
            let sql = format!("{copy}{options}");
            let error = parse_error(&sql);
            assert!(
                error.to_string().contains(secret),
                "the case echoes: {error}"
            );
            let redacted = redact_statement_error(error, &sql).to_string();
            assert!(!redacted.contains(secret), "{redacted}");
            assert!(redacted.contains("found: ***"), "{redacted}");
            assert!(redacted.contains("at Line: "), "{redacted}");
        }
        // Before the options, and without any, the token is what helps.
        for sql in [
            "COPY (SELEC 1) TO 's3://lake/out/' OPTIONS ('aws.region' 'x')".to_owned(),
            "SELECT 1 FROM t WHERE".to_owned(),
            "SELEC 1".to_owned(),
        ] {
            let error = parse_error(&sql).to_string();
            let redacted = redact_statement_error(parse_error(&sql), &sql).to_string();
            assert_eq!(redacted, error);
        }
    }

    /// DataFusion refuses `CREATE TABLE ... OPTIONS (...) AS` repeating the
    /// whole statement, written back by the parser.
    #[tokio::test]
    async fn a_statement_echoed_in_an_error_loses_its_secrets() {
        let state = datafusion::prelude::SessionContext::new().state();
        for (sql, secret) in [
            (
                "CREATE TABLE h3 STORED AS PARQUET LOCATION 's3://lake/h/' \
                 OPTIONS ('aws.secret_access_key' = 'HIVEECHO03', 'aws.region' = 'eu-west-1') \
                 AS SELECT 1",
                "HIVEECHO03",
            ),
            (
                "CREATE TABLE h4 (a INT) WITH (\"azure.account_key\" = 'WITHECHO04')",
                "WITHECHO04",
            ),
        ] {
            let error = state.create_logical_plan(sql).await.expect_err(sql);
            assert!(
                error.to_string().contains(secret),
                "the case echoes: {error}"
            );
            let redacted = redact_statement_error(error, sql).to_string();
            assert!(!redacted.contains(secret), "{redacted}");
            assert!(redacted.contains("***"), "{redacted}");
        }
    }

    #[test]
    fn a_store_option_without_its_prefix_is_refused_without_its_value() {
        for key in [
            "aws_session_token",
            "format.aws_secret_access_key",
            "azure_storage_account_key",
            "format.password",
            "bearer_token",
            // As object_store takes them too, with no prefix at all.
            "format.secret_access_key",
            "session_token",
            "format.account_key",
            "sas_token",
            "service_account_key",
            "format.region",
        ] {
            let options = HashMap::from([(key.to_owned(), "SECRET-VALUE".to_owned())]);
            let error = StoreOptions::from_statement_options(&options)
                .expect_err(key)
                .to_string();
            assert!(error.contains("is a store option"), "{error}");
            assert!(!error.contains("SECRET-VALUE"), "{error}");
        }
        for key in ["format.secret_access_key", "aws_secret_access_key"] {
            let error = refuse_unprefixed_store_option(key).expect_err(key);
            assert!(error.ends_with("as 'aws.secret_access_key'"), "{error}");
        }
        let error = refuse_unprefixed_store_option("format.token").expect_err("two kinds");
        assert!(error.contains("'aws.token' or 'azure.token'"), "{error}");
        // No option of any file format DataFusion knows is taken for a
        // store's (with no format chosen, its keys are `parquet.*`, ...).
        let formats = datafusion::config::TableOptions::default().entries();
        assert!(formats.len() > 30, "{}", formats.len());
        for entry in formats {
            let (_, name) = entry.key.split_once('.').expect("a format's key");
            let key = format!("format.{name}");
            let options = HashMap::from([(key.clone(), "1".to_owned())]);
            StoreOptions::from_statement_options(&options).expect(&key);
        }
    }

    #[test]
    fn an_endpoint_must_be_a_web_address_without_credentials() {
        let picked = |key: &str, value: &str| {
            StoreOptions::from_statement_options(&HashMap::from([(key.into(), value.into())]))
        };
        for good in [
            "http://127.0.0.1:9000",
            "https://s3.eu-west-1.amazonaws.com",
        ] {
            picked("aws.endpoint", good).expect(good);
            picked("azure.endpoint", good).expect(good);
        }
        for bad in [
            "127.0.0.1:9000",
            "http//127.0.0.1:9000",
            "http://127.0.0.1:9000 ",
            "ftp://host",
            "http://user:hunter2@host:9000",
        ] {
            let error = picked("aws.endpoint", bad).expect_err(bad).to_string();
            assert!(
                error.contains("'aws.endpoint' must be an http://"),
                "{error}"
            );
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn options_of_one_store_kind_are_refused_for_another() {
        let options = StoreOptions::from_pairs([("aws.region".into(), "eu-west-1".into())]);
        let url = |text: &str| Url::parse(text).expect(text);
        options
            .check_apply_to("s3://lake/t/", &url("s3://lake/t/"))
            .expect("aws options for S3");
        for (written, location) in [
            ("s3//lake/t/", "file:///work/s3/lake/t/"),
            ("gs://lake/t/", "gs://lake/t/"),
            ("memory://t/", "memory://t/"),
        ] {
            let error = options
                .check_apply_to(written, &url(location))
                .expect_err(written)
                .to_string();
            assert!(
                error.contains("'aws.*' are not for") && error.contains(written),
                "{error}"
            );
        }
    }

    #[test]
    fn store_options_are_picked_checked_and_shown_redacted() {
        let options = HashMap::from([
            ("aws.region".to_owned(), "eu-west-1".to_owned()),
            ("aws.secret_access_key".to_owned(), "s3cr3t".to_owned()),
            ("aws.allow_http".to_owned(), "true".to_owned()),
            ("format.compression".to_owned(), "zstd".to_owned()),
        ]);
        let picked = StoreOptions::from_statement_options(&options).expect("valid options");
        assert_eq!(picked.iter().count(), 3);
        let shown = picked.to_string();
        assert!(shown.contains("aws.region=eu-west-1"), "{shown}");
        assert!(shown.contains("aws.secret_access_key=***"), "{shown}");
        assert!(!format!("{picked:?}").contains("s3cr3t"));

        let typo = HashMap::from([("aws.secret_acces_key".to_owned(), "x".to_owned())]);
        let error = StoreOptions::from_statement_options(&typo).expect_err("typo refused");
        assert!(
            error.to_string().contains("aws.secret_acces_key"),
            "{error}"
        );
        assert!(!error.to_string().contains("'x'"));
    }

    #[test]
    fn sql_text_loses_its_secrets() {
        let sql = "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 's3://b/t/' \
                   OPTIONS ('aws.region' 'us-east-1', 'aws.secret_access_key' 'it''s-secret', \
                   'aws.access_key_id' 'AKIA1')";
        let redacted = redact_sql(sql);
        assert!(!redacted.contains("secret'"), "{redacted}");
        assert!(!redacted.contains("AKIA1"), "{redacted}");
        assert!(redacted.contains("'aws.region' 'us-east-1'"), "{redacted}");
        assert!(
            redacted.contains("'aws.secret_access_key' '***'"),
            "{redacted}"
        );
        assert!(redacted.contains("LOCATION 's3://b/t/'"), "{redacted}");
        assert_eq!(redact_sql("SELECT 'options'"), "SELECT 'options'");

        // A store option without its prefix, which planning refuses.
        let sql = "COPY t TO 's3://b/o/' STORED AS ARROW OPTIONS ('secret_access_key' 'Unpref1x')";
        let redacted = redact_sql(sql);
        assert!(
            redacted.ends_with("('secret_access_key' '***')"),
            "{redacted}"
        );
        let error = DataFusionError::Plan(format!("cannot take {sql}"));
        let error = redact_statement_error(error, sql).to_string();
        assert!(!error.contains("Unpref1x"), "{error}");
        // Elsewhere, such a name is a column's, and what follows is kept.
        let sql = "SELECT token FROM tokens";
        let error = DataFusionError::Plan(format!("cannot take {sql}"));
        let error = redact_statement_error(error, sql).to_string();
        assert!(error.ends_with(sql), "{error}");

        // However a value is written, over several lines, in COPY and EXPLAIN.
        let sql = "EXPLAIN COPY (SELECT 'é' AS a) TO 's3://b/out/' STORED AS PARQUET\n\
                   OPTIONS (aws.token TokWord, 'aws.secret_access_key' \"TokDQ\",\n  \
                   \"aws.access_key_id\" 12345, 'aws.region' 'eu-west-1', 'format.compression' zstd)";
        let redacted = redact_sql(sql);
        for secret in ["TokWord", "TokDQ", "12345"] {
            assert!(!redacted.contains(secret), "{secret}: {redacted}");
        }
        assert!(redacted.contains("aws.token '***'"), "{redacted}");
        assert!(redacted.contains("'aws.region' 'eu-west-1'"), "{redacted}");
        assert!(redacted.contains("'format.compression' zstd"), "{redacted}");
        assert!(redacted.contains("SELECT 'é' AS a"), "{redacted}");
        // Text that cannot be read loses everything after OPTIONS.
        assert_eq!(
            redact_sql("COPY t TO 'x' OPTIONS ('aws.token' 'abc'"),
            "COPY t TO 'x' OPTIONS (***)"
        );
    }
}
