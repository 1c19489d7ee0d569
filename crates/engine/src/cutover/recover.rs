//! Finishing or undoing a switch that a crash interrupted, from what the servers show. It runs
//! at the start of every command that changes something, and in the fence guard the moment
//! its pgshift dies.

use super::fence::Fence;
use super::fence_step;
use super::records;
use crate::decide::Direction;
use crate::error::Result;
use crate::events::Event;
use crate::names::step;
use crate::upgrade::Upgrade;

/// A fence recorded in some direction: if any database already recorded the switch in that
/// direction, the switch is completed (the fence still holds clients); otherwise the fence is
/// lifted so that clients carry on where they were.
pub(crate) async fn recover(up: &mut Upgrade) -> Result<()> {
    let observed = up.observe().await?;
    let fenced = |direction| observed.iter().any(|db| db.has(fence_step(direction)));
    // A cleaned-up database finished its switch long ago (cleanup recovers first).
    let switched: Vec<bool> = observed
        .iter()
        .filter(|db| !db.cleaned_up)
        .map(|db| db.switched())
        .collect();
    let (direction, done) = if fenced(Direction::Back) {
        (Direction::Back, switched.iter().any(|s| !s))
    } else if fenced(Direction::Forward) || (switched.contains(&true) && switched.contains(&false))
    {
        (Direction::Forward, switched.contains(&true))
    } else {
        return Ok(());
    };
    for name in up.databases.clone() {
        up.db(&name).await?;
    }
    let sw = up.switch_inputs(direction);
    if done {
        sw.emit(Event::Warning {
            message: format!(
                "an interrupted switch to the {} had already been recorded; completing it",
                sw.to.side
            ),
        });
        records::record_and_open(&sw).await?;
        Fence::settle_found(&sw, done).await?;
        records::mark_created_databases(&sw).await?;
    } else {
        sw.emit(Event::Warning {
            message: format!(
                "an interrupted cutover left writes fenced; releasing clients on the {}",
                sw.from.side
            ),
        });
        Fence::settle_found(&sw, done).await?;
    }
    // Neither a forward fence nor a rollback's is up now.
    for target in &sw.records {
        crate::upgrade::forget_step(target, step::FENCED).await?;
        crate::upgrade::forget_step(target, step::FENCED_BACK).await?;
    }
    Ok(())
}
