"""Which URLs of a payload are files, by JSON pointer, and the key each is kept at."""

from __future__ import annotations

from falhook.receiver.archive import FoundUrl, find_urls, object_key


def test_file_objects_and_bare_strings_by_pointer_data_uris_left_alone() -> None:
    payload = {
        "images": [
            {"url": "https://v3.fal.media/files/a/cat.png", "file_name": "cat.png", "width": 1},
            {"url": "https://v3.fal.media/files/b/dog.png", "content_type": "image/png"},
        ],
        "audio_url": "https://v3b.fal.media/files/x/voice.mp3",
        "a/b~c": "http://fal.media/files/y",
        "inline": "data:image/png;base64,AAAA",
        "text": "see https://example.com",  # not a URL string: it does not start with one
        "seed": 7,
    }
    found = find_urls(payload)
    assert found == [
        FoundUrl("/images/0/url", "https://v3.fal.media/files/a/cat.png", "cat.png", None),
        FoundUrl("/images/1/url", "https://v3.fal.media/files/b/dog.png", None, "image/png"),
        FoundUrl("/audio_url", "https://v3b.fal.media/files/x/voice.mp3"),
        FoundUrl("/a~1b~0c", "http://fal.media/files/y"),
    ]
    assert find_urls(None) == [] and find_urls("https://fal.media/x.png") == [
        FoundUrl("", "https://fal.media/x.png")
    ]


def test_keys_are_deterministic_and_keep_the_name_and_extension() -> None:
    found = FoundUrl("/images/0/url", "https://v3.fal.media/files/a/c%20at.png?x=1")
    assert object_key("fal", "req-1", found) == "fal/req-1/images-0-url/c_at.png"
    assert object_key("", "req-1", found) == "req-1/images-0-url/c_at.png"
    named = FoundUrl("/video", "https://fal.media/files/x", file_name="../../etc/passwd.mp4")
    assert object_key("", "r", named) == "r/video/passwd.mp4"
    bare = FoundUrl("", "https://fal.media/")
    assert object_key("", "../r", bare) == "r/payload/file"
    long = FoundUrl("/a", "https://fal.media/" + "x" * 300 + ".webm")
    assert object_key("", "r", long).endswith(".webm") and len(object_key("", "r", long)) < 140
