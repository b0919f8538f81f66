//! The 17 teams as the binary knows them: their identity docs (`teams/<id>/*.md`, compiled
//! in) and the objective prompt built from them.

/// One team's documents.
#[derive(Debug, Clone, Copy)]
pub struct Team {
    pub id: &'static str,
    /// Mission, values, how it decides.
    pub soul: &'static str,
    /// Its operatives; the first is the lead who writes the TaskResult.
    pub agents: &'static str,
    /// Its tools; the line `tools: a, b` grants them.
    pub tools: &'static str,
    /// The objective template, with `{{placeholders}}`.
    pub objective: &'static str,
}

/// Both tables from one list, so the ids and the documents cannot drift apart.
macro_rules! teams {
    ($($id:literal),* $(,)?) => {
        /// The 17 team ids of the contract (§5), in the contract's order.
        pub const TEAM_IDS: [&str; 17] = [$($id),*];

        /// In the contract's order (the same as [`TEAM_IDS`]).
        pub static TEAMS: [Team; 17] = [$(Team {
            id: $id,
            soul: include_str!(concat!("../", $id, "/SOUL.md")),
            agents: include_str!(concat!("../", $id, "/AGENTS.md")),
            tools: include_str!(concat!("../", $id, "/TOOLS.md")),
            objective: include_str!(concat!("../", $id, "/OBJECTIVE.md")),
        }),*];
    };
}

teams!(
    "product-management",
    "solution-architecture",
    "feature-engineering",
    "frontend-engineering",
    "backend-engineering",
    "database-engineering",
    "devops",
    "qa-engineering",
    "security-engineering",
    "data-engineering",
    "ml-engineering",
    "api-design",
    "documentation",
    "business-analysis",
    "ux-ui-design",
    "compliance-legal",
    "sre-operations",
);

pub fn team(id: &str) -> Option<&'static Team> {
    TEAMS.iter().find(|t| t.id == id)
}

/// What fills an objective template.
#[derive(Debug, Clone, Default)]
pub struct ObjectiveContext<'a> {
    pub title: &'a str,
    pub requirement: &'a str,
    /// The earlier stages' results and artifacts, already rendered.
    pub inputs: &'a str,
    pub feedback: &'a str,
    pub iteration: u32,
    pub max_iterations: u32,
}

impl Team {
    /// The system prompt: who the team is and who works in it.
    pub fn system_prompt(&self) -> String {
        format!("{}\n\n{}", self.soul.trim(), self.agents.trim())
    }

    /// The objective prompt from the template. Values are inserted once, left to right, so
    /// text in a requirement that looks like a placeholder is never expanded.
    pub fn objective_prompt(&self, cx: &ObjectiveContext<'_>) -> String {
        let iteration = cx.iteration.to_string();
        let max_iterations = cx.max_iterations.to_string();
        let inputs = if cx.inputs.trim().is_empty() { "(none: this is the first stage)" } else { cx.inputs };
        let feedback = if cx.feedback.trim().is_empty() { "(none)" } else { cx.feedback };
        let mut out = String::with_capacity(self.objective.len() + cx.requirement.len() + inputs.len());
        let mut rest = self.objective;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let value = match &after[..end] {
                "title" => cx.title,
                "requirement" => cx.requirement,
                "inputs" => inputs,
                "feedback" => feedback,
                "iteration" => &iteration,
                "max_iterations" => &max_iterations,
                other => {
                    // Unknown placeholders stay visible rather than silently vanish.
                    out.push_str("{{");
                    out.push_str(other);
                    out.push_str("}}");
                    rest = &after[end + 2..];
                    continue;
                }
            };
            out.push_str(value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_team_of_the_contract_has_its_four_documents() {
        assert_eq!(TEAMS.len(), TEAM_IDS.len());
        for (team, id) in TEAMS.iter().zip(TEAM_IDS) {
            assert_eq!(team.id, id);
            for doc in [team.soul, team.agents, team.tools, team.objective] {
                assert!(doc.trim().len() > 100, "{id} has a thin document");
            }
            for placeholder in ["title", "requirement", "inputs", "feedback", "iteration", "max_iterations"] {
                assert!(team.objective.contains(&format!("{{{{{placeholder}}}}}")), "{id} lacks {placeholder}");
            }
        }
    }

    #[test]
    fn teams_are_written_for_their_roles() {
        for (i, a) in TEAMS.iter().enumerate() {
            for b in &TEAMS[i + 1..] {
                assert_ne!(a.soul, b.soul);
                assert_ne!(a.objective, b.objective);
            }
        }
    }

    #[test]
    fn the_prompt_fills_every_placeholder_once() {
        let team = team("backend-engineering").unwrap();
        let prompt = team.objective_prompt(&ObjectiveContext {
            title: "Shortener",
            requirement: "Build a URL shortener {{feedback}}",
            inputs: "",
            feedback: "",
            iteration: 2,
            max_iterations: 3,
        });
        assert!(prompt.contains("Build a URL shortener {{feedback}}"), "values are not expanded again");
        assert!(prompt.contains("iteration 2 of 3"));
        assert!(prompt.contains("(none: this is the first stage)"));
        assert!(!prompt.contains("{{title}}") && !prompt.contains("{{inputs}}"));
        assert!(team.system_prompt().contains("Backend"));
    }
}
