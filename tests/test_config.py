"""Options: every option is checked by type and value when a Client is made, and a mistake
is a ConfigurationError (a ValueError) naming the option, before any queue file exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

import segmentry
from segmentry.config import Options, check_url, normalize_url
from segmentry.exceptions import ConfigurationError


def make(tmp_path, **options):
    return segmentry.Client("K", **{"queue_path": str(tmp_path / "q.db"), **options})


@pytest.mark.parametrize("option, named", [
    ({"send_to_http": "false"}, "send_to_http"),
    ({"send_to_http": 0}, "send_to_http"),
    ({"gzip": "yes"}, "gzip"),
    ({"queue_path": 123}, "queue_path"),
    ({"queue_path": ""}, "queue_path"),
    ({"requests_options": {"timeout": "x"}}, "timeout"),
    ({"requests_options": {"bogus": 1}}, "bogus"),
    ({"requests_options": [("timeout", 1)]}, "requests_options"),
    ({"requests_options": {"proxies": "http://proxy:3128"}}, "proxies"),
    ({"requests_options": {"proxies": {"https": "notaurl"}}}, "proxy 'https'"),
    ({"requests_options": {"proxies": {"https": "ftp://proxy:21"}}}, "proxy 'https'"),
    ({"requests_options": {"verify": 1}}, "verify"),
    ({"requests_options": {"verify": "/nope.pem"}}, "/nope.pem does not exist"),
    ({"requests_options": {"cert": "/nope.pem"}}, "/nope.pem does not exist"),
    ({"requests_options": {"cert": ("/nope.pem", "/nope.key")}}, "cert"),
    ({"requests_options": {"cert": 5}}, "cert"),
    ({"requests_options": {"headers": {"X-Bad": "a\nb"}}}, "header 'X-Bad'"),
    ({"requests_options": {"session": "s"}}, "session"),
    ({"requests_options": {"adapter": object()}}, "adapter"),
    ({"api_url": "http://exa mple/"}, "api_url"),
    ({"on_error": "print"}, "on_error"),
])
def test_a_bad_option_is_a_configuration_error_naming_it(tmp_path, option, named):
    with pytest.raises(ConfigurationError, match=named) as excinfo:
        make(tmp_path, **option)
    assert isinstance(excinfo.value, ValueError)
    assert not os.listdir(tmp_path)  # refused before the queue file was made


def test_existing_files_and_a_real_session_are_accepted(tmp_path):
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "c.key"))
    for path in (ca, cert, key):
        path.write_text("-----BEGIN-----\n")
    session = requests.Session()
    options = Options(requests_options={
        "verify": str(ca), "cert": (str(cert), str(key)), "session": session,
        "proxies": {"https": "http://proxy.test:3128", "http": None},
        "headers": {"X-Tenant": "t1", b"X-Raw": b"v"}, "timeout": (2, 5)})
    assert options.requests_options["session"] is session
    assert Options(requests_options={"verify": str(tmp_path)}).requests_options  # a CA dir
    assert Options(requests_options={"verify": False}).requests_options == {"verify": False}


def test_a_ca_bundle_that_is_a_directory_is_fine_a_cert_that_is_one_is_not(tmp_path):
    with pytest.raises(ConfigurationError, match="is a directory"):
        Options(requests_options={"cert": str(tmp_path)})


def test_queue_path_takes_a_path_object_and_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Options(queue_path=Path("q.db")).queue_path == str(tmp_path / "q.db")


@pytest.mark.parametrize("url, words", [
    ("http://exa mple/", "space"),
    ("http://host\t/", "space"),
    ("http://exa\x00mple/", "control"),
    ("ftp://host/", "http:// or https://"),
    ("receiver.test/v1", "like http://"),
    ("http:///v1/", "no valid host"),
    ("http://ho<st/", "no valid host"),
    ("http://host:port/", "invalid port"),
    ("http://host:99999/", "invalid port"),
    ("http://host/v1/?key=x", "no query"),
    (None, "like http://"),
])
def test_an_api_url_requests_cannot_send_to_is_refused(url, words):
    with pytest.raises(ConfigurationError, match=f"api_url.*{words}|{words}.*api_url"):
        normalize_url(url)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/v1", "https://api.segment.io/v1/", "http://[::1]:9/",
    "https://user@events.example.com/v1/", "https://bücher.example/v1/",
])
def test_a_good_api_url_ends_with_a_slash(url):
    assert normalize_url(url) == url.rstrip("/") + "/"
    requests.Request("POST", normalize_url(url) + "batch").prepare()  # requests agrees


def test_check_url_names_the_setting_it_checks():
    with pytest.raises(ConfigurationError, match="^--proxy must be a URL"):
        check_url("--proxy", "notaurl", ("http", "https"))


def test_the_environment_is_checked_like_keywords(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENTRY_API_URL", "http://exa mple/")
    with pytest.raises(ConfigurationError, match="api_url"):
        segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None)
