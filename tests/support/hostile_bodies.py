"""Hostile bodies, each at most 1 MiB: XML bombs, entities and DTDs, and XML and JSON too
deep or too wide. The memory bound of refusing each is asserted in
tests/callback/test_hostile_bodies.py; tests/callback/test_xml_parity.py and
`python bench/parse.py` use them too."""

from __future__ import annotations

MiB = 1024 * 1024

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Response><EventName>&lol9;</EventName></Response>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Response><EventName>&xxe;</EventName></Response>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE Response SYSTEM "http://127.0.0.1:9/evil.dtd">
<Response><EventName>TaskFinish</EventName></Response>"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]>
<Response/>"""

QUADRATIC_BLOWUP = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "'
    + b"x" * 100_000
    + b'">]><Response><EventName>'
    + b"&a;" * 200_000
    + b"</EventName></Response>"
)[: MiB - 1]

DEEP_XML = (b"<a>" * (MiB // 7) + b"</a>" * (MiB // 7))[:MiB]
WIDE_XML = b"<Response>" + b"<a/>" * ((MiB - 30) // 4) + b"</Response>"
# One element with as many attributes as fit: expat reads them all before the guard
# sees the element, so this one costs more than the others (and is still bounded).
ATTRIBUTES = b"<Response><a " + b" ".join(b'x%d="1"' % i for i in range(200_000))
ATTRIBUTES = ATTRIBUTES[: ATTRIBUTES.rfind(b" ", 0, MiB - 20)] + b"/></Response>"
MANY_ATTRIBUTES = b"<Response>" + b'<a x="1" y="2" z="3"/>' * ((MiB - 30) // 22) + b"</Response>"
DEEP_JSON = b'{"a":' * (MiB // 6)
DEEP_JSON_WITHIN_ORJSON = b"[" * 1000 + b"]" * 1000
WIDE_JSON = b"[" + b"0," * ((MiB - 4) // 2) + b"0]"
