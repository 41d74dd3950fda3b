"""The icon: the one the dashboard's pages link to, and /favicon.ico for the API, both served."""

from __future__ import annotations

from html.parser import HTMLParser

from tests.support import ROOT
from tests.test_security import KEY_A, basic, make_app

ICON = (ROOT / "service" / "static" / "favicon.ico").read_bytes()


class IconLinks(HTMLParser):
    """The href of every <link rel="... icon"> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "link" and "icon" in (found.get("rel") or "").split():
            self.hrefs.append(found["href"] or "")


def icon_links(page: str) -> list[str]:
    parser = IconLinks()
    parser.feed(page)
    return parser.hrefs


def assert_icon(response) -> None:
    with response:  # a file is sent: close it
        assert response.status_code == 200, response.get_data(as_text=True)[:300]
        assert response.mimetype.startswith("image/"), response.mimetype
        assert response.get_data() == ICON


def test_the_icon_the_dashboard_links_to_is_served(fake_redis, tmp_path):
    client = make_app(tmp_path, dashboard_user="ops", dashboard_password="s3cret").test_client()
    page = client.get("/rq/", headers=basic("ops", "s3cret"))
    assert page.status_code == 200
    hrefs = icon_links(page.get_data(as_text=True))
    assert hrefs == ["/static/favicon.ico"]
    for href in hrefs:
        assert_icon(client.get(href))  # a browser asks without the dashboard's credentials


def test_favicon_ico_answers_without_a_key(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,)).test_client()
    assert_icon(client.get("/favicon.ico"))
    assert client.get("/jobs").status_code == 401  # the API itself still needs its key


def test_the_icons_the_api_docs_page_links_to_are_served(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,)).test_client()
    page = client.get("/docs/")
    hrefs = icon_links(page.get_data(as_text=True))
    assert hrefs  # Swagger UI's own icons
    for href in hrefs:
        with client.get(href) as response:
            assert response.status_code == 200 and response.mimetype.startswith("image/"), href
