"""Password hashers of old Django releases, so their hashes still verify (and get upgraded).

Django 5.1 removed the unsalted MD5 and SHA1 hashers and the salted SHA1 one; a project that
started on Django 1.x may still hold such hashes. These are the classes Django 5.0 shipped,
trimmed to what verification needs. They come last in PASSWORD_HASHERS: a user who logs in
with one of these hashes gets it re-hashed with the first (strong) hasher.
"""

import hashlib

from django.contrib.auth.hashers import BasePasswordHasher, mask_hash, must_update_salt
from django.utils.crypto import constant_time_compare


class SHA1PasswordHasher(BasePasswordHasher):
    """Salted SHA1 (`sha1$salt$hash`), Django's default before 1.4."""

    algorithm = "sha1"

    def encode(self, password, salt):
        self._check_encode_args(password, salt)
        hash = hashlib.sha1((salt + password).encode()).hexdigest()
        return f"{self.algorithm}${salt}${hash}"

    def decode(self, encoded):
        algorithm, salt, hash = encoded.split("$", 2)
        assert algorithm == self.algorithm
        return {"algorithm": algorithm, "hash": hash, "salt": salt}

    def verify(self, password, encoded):
        decoded = self.decode(encoded)
        return constant_time_compare(encoded, self.encode(password, decoded["salt"]))

    def safe_summary(self, encoded):
        decoded = self.decode(encoded)
        return {
            "algorithm": decoded["algorithm"],
            "salt": mask_hash(decoded["salt"], show=2),
            "hash": mask_hash(decoded["hash"]),
        }

    def must_update(self, encoded):
        return must_update_salt(self.decode(encoded)["salt"], self.salt_entropy)

    def harden_runtime(self, password, encoded):
        pass


class UnsaltedSHA1PasswordHasher(BasePasswordHasher):
    """`sha1$$hash`: SHA1 with an empty salt."""

    algorithm = "unsalted_sha1"

    def salt(self):
        return ""

    def encode(self, password, salt):
        if salt != "":
            raise ValueError("salt must be empty.")
        return "sha1$$" + hashlib.sha1(password.encode()).hexdigest()

    def decode(self, encoded):
        assert encoded.startswith("sha1$$")
        return {"algorithm": self.algorithm, "hash": encoded[6:], "salt": None}

    def verify(self, password, encoded):
        return constant_time_compare(encoded, self.encode(password, ""))

    def safe_summary(self, encoded):
        return {"algorithm": self.algorithm, "hash": mask_hash(self.decode(encoded)["hash"])}

    def harden_runtime(self, password, encoded):
        pass


class UnsaltedMD5PasswordHasher(BasePasswordHasher):
    """A bare MD5 hex digest, or `md5$$hash`: MD5 with no salt, from the earliest Django."""

    algorithm = "unsalted_md5"

    def salt(self):
        return ""

    def encode(self, password, salt):
        if salt != "":
            raise ValueError("salt must be empty.")
        return hashlib.md5(password.encode()).hexdigest()

    def decode(self, encoded):
        return {"algorithm": self.algorithm, "hash": encoded, "salt": None}

    def verify(self, password, encoded):
        if len(encoded) == 37:
            encoded = encoded.removeprefix("md5$$")
        return constant_time_compare(encoded, self.encode(password, ""))

    def safe_summary(self, encoded):
        return {"algorithm": self.algorithm, "hash": mask_hash(encoded, show=3)}

    def harden_runtime(self, password, encoded):
        pass
