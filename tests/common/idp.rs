//! Reading what the fake identity provider (wiremock) received.

use wiremock::MockServer;

/// The form fields of the last request to `/token`.
pub async fn last_token_form(idp: &MockServer) -> Vec<(String, String)> {
    let requests = idp.received_requests().await.unwrap();
    let last = requests
        .iter()
        .rev()
        .find(|r| r.url.path() == "/token")
        .expect("a token request");
    reqwest::Url::parse(&format!(
        "http://x/?{}",
        String::from_utf8_lossy(&last.body)
    ))
    .unwrap()
    .query_pairs()
    .map(|(k, v)| (k.into_owned(), v.into_owned()))
    .collect()
}

/// One form field, if present.
pub fn form_field<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}
