"""A person at a browser, for tests/interop.rs: opens START (the device page, or an authorization URL), enters
the user code if one is given, signs in as LOGIN and consents, following oidc-provider's devInteractions forms.
Prints the URL the browser ends on. Python's standard library only."""
import http.cookiejar
import sys
import urllib.parse
import urllib.request
from html.parser import HTMLParser


class Forms(HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action"), "fields": {}})
        elif tag in ("input", "button") and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""


def main():
    start, login = sys.argv[1], sys.argv[2]
    user_code = sys.argv[3] if len(sys.argv) > 3 else None
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = browser.open(start, timeout=10)
    for _ in range(8):
        parser = Forms()
        parser.feed(page.read().decode())
        if not parser.forms:
            break
        form = parser.forms[0]
        fields = form["fields"]
        fields.pop("abort", None)  # the Cancel button
        if "user_code" in fields and user_code:
            fields["user_code"] = user_code
        if "login" in fields:
            fields["login"], fields["password"] = login, "any"
        action = urllib.parse.urljoin(page.geturl(), form["action"] or page.geturl())
        page = browser.open(action, urllib.parse.urlencode(fields).encode(), timeout=10)
    print(page.geturl())


main()
