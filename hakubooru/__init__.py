"""hakubooru: danbooru2023 metadata + image archives -> captioned webdataset shards."""
