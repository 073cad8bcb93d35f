//! GitLab-compatible route classes (notes/gitlab.md, "Route classes"): GitLab's handler order,
//! the first match wins. Regexes are compiled once and run in linear time (`regex` crate).

use std::sync::LazyLock;

use regex::Regex;

use crate::config::RouteSet;
use crate::job::Route;

/// A reply key: legacy 32 lowercase hex, or partitioned `<partition>-<key>[-<namespace>]`.
const REPLY_KEY: &str = r"(?:[a-f0-9]{32}|[0-9a-z]{1,4}-[0-9a-z]{25}(?:-[0-9a-z]{1,13})?)";
/// `(?<project_slug>.+)-(?<project_id>\d+)` (ASCII digits, as Ruby's `\d`).
const PROJECT: &str = r".+-[0-9]+";

struct Patterns {
    reply: Regex,
    new_issue: Regex,
    note_on_issuable: Regex,
    unsubscribe: Regex,
    new_merge_request: Regex,
    merge_request_legacy: Regex,
    service_desk: Regex,
    service_desk_key: Regex,
}

fn anchored(body: &str) -> Regex {
    // The patterns are constants: failing to compile one is a bug caught by every test.
    Regex::new(&format!(r"\A(?:{body})\z")).expect("constant route regex")
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    reply: anchored(REPLY_KEY),
    new_issue: anchored(&format!("{PROJECT}-.+-issue")),
    note_on_issuable: anchored(&format!("{PROJECT}-.+-issue-[0-9]+")),
    unsubscribe: anchored(&format!(r"{REPLY_KEY}(?:-|\+)unsubscribe")),
    new_merge_request: anchored(&format!("{PROJECT}-.+-merge-request")),
    merge_request_legacy: anchored(r"[^+]*\+merge-request\+.*"),
    service_desk: anchored(&format!("{PROJECT}-issue-")),
    service_desk_key: anchored(r".+-[a-z0-9_]+"),
});

/// The route class of `key` on the mailbox `mailbox_name`. `routes = "any"`: every non-empty
/// key is [`Route::Key`].
pub fn classify(key: &str, routes: RouteSet, mailbox_name: &str) -> Route {
    if key.is_empty() {
        return Route::Unknown;
    }
    if routes == RouteSet::Any {
        return Route::Key;
    }
    let p = &*PATTERNS;
    // The `P-…` forms never apply to a key with a `/` (that is a legacy project path).
    let p_form = !key.contains('/');
    if p.reply.is_match(key) {
        Route::Reply
    } else if (p_form && p.new_issue.is_match(key)) || new_issue_legacy(key) {
        Route::NewIssue
    } else if p_form && p.note_on_issuable.is_match(key) {
        Route::NoteOnIssuable
    } else if p.unsubscribe.is_match(key) {
        Route::Unsubscribe
    } else if (p_form && p.new_merge_request.is_match(key)) || p.merge_request_legacy.is_match(key) {
        Route::NewMergeRequest
    } else if (p_form && p.service_desk.is_match(key))
        || (key.contains('/') && !key.contains('+'))
        || (mailbox_name == "service_desk" && p.service_desk_key.is_match(key))
    {
        Route::ServiceDesk
    } else {
        Route::Unknown
    }
}

/// `(?<path>[^+]*)\+(?<token>.*)` with a token without `+`, and no `+unsubscribe` in the key.
fn new_issue_legacy(key: &str) -> bool {
    match key.split_once('+') {
        Some((_path, token)) => !token.contains('+') && !key.contains("+unsubscribe"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef";
    const PART: &str = "1a-0123456789abcdefghijklmno";

    fn gl(key: &str) -> Route {
        classify(key, RouteSet::Gitlab, "incoming")
    }

    #[test]
    fn reply() {
        assert_eq!(gl(HEX), Route::Reply);
        assert_eq!(gl(PART), Route::Reply);
        assert_eq!(gl(&format!("{PART}-ns42")), Route::Reply);
        assert_eq!(gl("z-0123456789abcdefghijklmno"), Route::Reply);
        // wrong length, uppercase, too long a partition or namespace
        assert_eq!(gl(&HEX[1..]), Route::Unknown);
        assert_eq!(gl(&format!("{HEX}0")), Route::Unknown);
        assert_eq!(gl(&HEX.to_uppercase()), Route::Unknown);
        assert_eq!(gl("12345-0123456789abcdefghijklmno"), Route::Unknown);
        assert_eq!(gl(&format!("{PART}-01234567890123")), Route::Unknown);
        assert_eq!(gl("1a-0123456789abcdefghijklmnO"), Route::Unknown);
    }

    #[test]
    fn new_issue() {
        assert_eq!(gl("gitlab-org-gitlab-20-glimt-abc-issue"), Route::NewIssue);
        assert_eq!(gl("gitlab-org-gitlab-ce-20-Author_Token12345678-issue"), Route::NewIssue);
        // legacy: path+token
        assert_eq!(gl("gitlab-org/gitlab-ce+Author_Token12345678"), Route::NewIssue);
        assert_eq!(gl("a/b+c"), Route::NewIssue);
        assert_eq!(gl("+token"), Route::NewIssue);
        // no project id, a `/` in a P-form, a `+` in the legacy token, +unsubscribe
        assert_eq!(gl("gitlab-org-gitlab-glimt-abc-issue"), Route::Unknown);
        // a `/` and no `+`: not a P-form but a legacy service desk project path
        assert_eq!(gl("gitlab-org/gitlab-20-glimt-abc-issue"), Route::ServiceDesk);
        assert_eq!(gl("path+tok+en"), Route::Unknown);
        assert_eq!(gl("path+unsubscribe"), Route::Unknown);
        assert_eq!(gl("path+unsubscribed"), Route::Unknown);
        // non-ASCII digits are not a project id
        assert_eq!(gl("gitlab-org-gitlab-٢٠-glimt-abc-issue"), Route::Unknown);
    }

    #[test]
    fn note_on_issuable() {
        assert_eq!(gl("gitlab-org-gitlab-20-glimt-abc-issue-34"), Route::NoteOnIssuable);
        // a `/` and no `+`: not a P-form but a legacy service desk project path
        assert_eq!(gl("gitlab-org/gitlab-20-glimt-abc-issue-34"), Route::ServiceDesk);
        assert_eq!(gl("gitlab-org-gitlab-20-glimt-abc-issue-x"), Route::Unknown);
    }

    #[test]
    fn unsubscribe() {
        assert_eq!(gl(&format!("{HEX}-unsubscribe")), Route::Unsubscribe);
        assert_eq!(gl(&format!("{HEX}+unsubscribe")), Route::Unsubscribe);
        assert_eq!(gl("abc-unsubscribe"), Route::Unknown);
        assert_eq!(gl(&format!("{HEX}-unsubscribe-now")), Route::Unknown);
        // As in GitLab (same regexes, same order), a partitioned key's optional namespace part
        // also matches `unsubscribe`, so the reply route wins.
        assert_eq!(gl(&format!("{PART}-unsubscribe")), Route::Reply);
        assert_eq!(gl(&format!("{PART}-ns-unsubscribe")), Route::Unsubscribe);
    }

    #[test]
    fn new_merge_request() {
        assert_eq!(gl("gitlab-org-gitlab-20-glimt-abc-merge-request"), Route::NewMergeRequest);
        assert_eq!(gl("gitlab-org/gitlab+merge-request+Author_Token"), Route::NewMergeRequest);
        // a `/` and no `+`: not a P-form but a legacy service desk project path
        assert_eq!(gl("gitlab-org/gitlab-20-glimt-abc-merge-request"), Route::ServiceDesk);
        assert_eq!(gl("gitlab-org-gitlab-merge-request"), Route::Unknown);
    }

    #[test]
    fn service_desk() {
        assert_eq!(gl("gitlab-org-gitlab-20-issue-"), Route::ServiceDesk);
        assert_eq!(gl("gitlab-org/gitlab"), Route::ServiceDesk);
        assert_eq!(gl("gitlab-org/gitlab-ce"), Route::ServiceDesk);
        assert_eq!(gl("gitlab-org/gitlab-20-issue-"), Route::ServiceDesk); // legacy path form
        assert_eq!(gl("gitlab-org-gitlab-issue-"), Route::Unknown);
        // the custom service desk key form only on the service_desk mailbox
        assert_eq!(gl("gitlab-org-gitlab-mykey_1"), Route::Unknown);
        assert_eq!(classify("gitlab-org-gitlab-mykey_1", RouteSet::Gitlab, "service_desk"), Route::ServiceDesk);
        assert_eq!(classify("gitlab-org-gitlab-MyKey", RouteSet::Gitlab, "service_desk"), Route::Unknown);
        // earlier routes still win on the service desk mailbox
        assert_eq!(classify(HEX, RouteSet::Gitlab, "service_desk"), Route::Reply);
        assert_eq!(classify("gitlab-org-gitlab-20-glimt-abc-issue", RouteSet::Gitlab, "service_desk"), Route::NewIssue);
    }

    #[test]
    fn unknown() {
        for key in ["", "hello", "abc-def", "UPPER", "a/b+c+d", "gitlab-org-gitlab-20"] {
            assert_eq!(gl(key), Route::Unknown, "{key}");
        }
    }

    #[test]
    fn any_routes() {
        assert_eq!(classify("hello", RouteSet::Any, "incoming"), Route::Key);
        assert_eq!(classify(HEX, RouteSet::Any, "incoming"), Route::Key);
        assert_eq!(classify("", RouteSet::Any, "incoming"), Route::Unknown);
    }

    #[test]
    fn long_keys_are_linear() {
        let key = "a-1-".repeat(50_000) + "x";
        let start = std::time::Instant::now();
        assert_eq!(gl(&key), Route::Unknown);
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }
}
