//! Which storage regions count as EU: an explicit allow-list, never a prefix.
//!
//! A prefix rule such as `eu-*` is wrong in both directions: AWS `eu-west-2` is
//! London and `eu-central-2` Zurich, neither in the EU, while Azure's
//! `westeurope` is in the Netherlands. So a region tag is accepted only if it is
//!
//! 1. the ISO 3166-1 alpha-2 code of an EU member state (`nl`, `de`, `fr`, ...),
//! 2. such a code followed by `-` and a site name (`nl-ams1`, `de-fra-2`), or
//! 3. one of the provider regions in [`PROVIDER_REGIONS`], all located in EU
//!    member states, optionally with an availability-zone suffix
//!    (`eu-central-1a`, `europe-west4-b`).
//!
//! Everything else is refused, including EEA and EFTA countries (`no`, `ch`,
//! `is`, `li`) and the United Kingdom (`gb`, `uk`).

/// ISO 3166-1 alpha-2 codes of the 27 EU member states.
pub const EU_COUNTRIES: [&str; 27] = [
    "at", "be", "bg", "cy", "cz", "de", "dk", "ee", "es", "fi", "fr", "gr", "hr", "hu", "ie", "it", "lt", "lu", "lv",
    "mt", "nl", "pl", "pt", "ro", "se", "si", "sk",
];

/// Cloud provider regions located in EU member states, with their country.
pub const PROVIDER_REGIONS: [(&str, &str); 27] = [
    // AWS
    ("eu-central-1", "de"),
    ("eu-west-1", "ie"),
    ("eu-west-3", "fr"),
    ("eu-north-1", "se"),
    ("eu-south-1", "it"),
    ("eu-south-2", "es"),
    // Google Cloud
    ("europe-west1", "be"),
    ("europe-west3", "de"),
    ("europe-west4", "nl"),
    ("europe-west8", "it"),
    ("europe-west9", "fr"),
    ("europe-west10", "de"),
    ("europe-west12", "it"),
    ("europe-north1", "fi"),
    ("europe-central2", "pl"),
    ("europe-southwest1", "es"),
    // Azure
    ("westeurope", "nl"),
    ("northeurope", "ie"),
    ("francecentral", "fr"),
    ("germanywestcentral", "de"),
    ("swedencentral", "se"),
    ("italynorth", "it"),
    ("polandcentral", "pl"),
    ("spaincentral", "es"),
    // Hetzner
    ("fsn1", "de"),
    ("nbg1", "de"),
    ("hel1", "fi"),
];

/// The EU member state a region tag is in, or `None` if it is not (known to be) in the EU.
pub fn eu_country(region: &str) -> Option<&'static str> {
    if let Some(c) = EU_COUNTRIES.iter().find(|c| **c == region) {
        return Some(c);
    }
    if let Some((code, site)) = region.split_once('-')
        && let Some(c) = EU_COUNTRIES.iter().find(|c| **c == code)
        && is_site_name(site)
    {
        return Some(c);
    }
    PROVIDER_REGIONS.iter().find_map(|(name, country)| {
        let rest = region.strip_prefix(name)?;
        is_zone_suffix(name, rest).then_some(*country)
    })
}

/// `ams1`, `fra-2`: lowercase letters and digits in `-`-separated parts.
fn is_site_name(site: &str) -> bool {
    !site.is_empty()
        && site
            .split('-')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
}

/// Nothing, or an availability zone: AWS appends a letter (`eu-central-1a`),
/// Google Cloud `-` and a letter (`europe-west4-b`).
fn is_zone_suffix(region: &str, rest: &str) -> bool {
    let letter = |s: &str| s.len() == 1 && s.chars().all(|c| c.is_ascii_lowercase());
    match rest {
        "" => true,
        _ if region.starts_with("eu-") => letter(rest),
        _ if region.starts_with("europe-") => rest.strip_prefix('-').is_some_and(letter),
        _ => false,
    }
}

/// A one-line description of what is accepted, for error messages.
pub fn allowed_description() -> String {
    format!(
        "an EU member state code ({}), such a code with a site (e.g. nl-ams1), or an EU provider region ({})",
        EU_COUNTRIES.join(", "),
        PROVIDER_REGIONS.iter().map(|(r, _)| *r).collect::<Vec<_>>().join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eu_regions_are_accepted_with_their_country() {
        for (region, country) in [
            ("nl", "nl"),
            ("de-fra1", "de"),
            ("nl-ams-2", "nl"),
            ("eu-central-1", "de"),
            ("eu-central-1a", "de"),
            ("europe-west4", "nl"),
            ("europe-west4-b", "nl"),
            ("westeurope", "nl"),
            ("hel1", "fi"),
        ] {
            assert_eq!(eu_country(region), Some(country), "{region}");
        }
    }

    #[test]
    fn regions_outside_the_eu_are_refused() {
        for region in [
            "us-east-1",
            "eu-west-2",
            "eu-central-2",
            "europe-west2",
            "europe-west6",
            "uksouth",
            "switzerlandnorth",
            "norwayeast",
            "gb",
            "uk",
            "ch",
            "no",
            "ch-zrh1",
            "eu",
            "europe",
            "",
            "NL",
            "nl-",
            "nl-ams_1",
            "eu-central-1ab",
            "europe-west4b",
            "westeurope-a",
        ] {
            assert_eq!(eu_country(region), None, "{region:?}");
        }
    }
}
